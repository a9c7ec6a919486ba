"""Collaborative <trigger, target> pairs: U2I and Swing mining and their union
(mining.py), the Swing kernel (swing.py) and the BPR-MF retrieval model U2I mining uses
(retrieval.py).
"""
