"""Cell identity codes: a dense autoencoder of gene-expression profiles (Abdolhosseini et al. 2019)."""
