"""Hugging Face transformers attention (placeholder until the HF adapter lands)."""
