"""Standalone training of annealing guidance checkpoints (never imported by the ComfyUI nodes).

``training.algorithm`` holds Algorithm 1 of the paper, shared by the image backends and the 2D benchmark.
"""
