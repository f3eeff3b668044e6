"""The engine: batching, forward passes, the reasoning decoder, decoding settings and the candidate path.

The encoder (and anything else that runs the model) uses the engine; the engine imports none of them.
"""
