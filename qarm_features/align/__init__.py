"""The aligner: a trainable head over the frozen content embedding, fitted on mined
<trigger, target> pairs with symmetric in-batch InfoNCE (aligner.py), and the contrastive
loss it shares with the encoder fine-tuner (contrastive.py). Training only: torch.
"""
