"""Reading and writing: checkpoints, downloads, the feature store, image folders, the VAE, run folders and their locks."""
