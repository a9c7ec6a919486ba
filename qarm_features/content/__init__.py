"""Content encoders: the frozen text, CLIP and precomputed encoders (encoders.py) and the
fine-tuner that trains a text encoder's top layers on recommendation pairs (finetune.py).
"""
