"""Multi-channel fluorescence sites (RxRx1): supervised ArcFace and the mean teacher (DeepNoise)."""
