"""Distilled Decoding (DD1): the token flow, the sequence flow map, students and their samplers."""
