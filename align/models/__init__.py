"""Model building and loading: the tiny offline models and safe from_pretrained."""
