"""Images/s of the batch iterator over tfds array_record datasets (see README.md)."""
