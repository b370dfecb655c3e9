"""Data: readers and writers of the real formats (Vision-Flan/LLaVA JSON, MME folders) and the embedded generator."""
