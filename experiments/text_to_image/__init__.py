"""Text-to-image on Fashion-MNIST: class, attribute and negative prompts, guidance sweep."""
