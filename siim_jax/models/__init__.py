"""ViT encoder, SiameseIM online/target model, MAE baseline."""
