"""Entry points behind `bin/*`: parse absl flags, build config objects, call the library."""
