"""The BN library: BN from its equations and flax's BatchNorm drop-ins (linen: batchnorm.py, NNX:
nnx.py) with the variants, precise BN for any model (update_bn.py), the BN check-up (checkup.py).
Imports only bnjax.support: nothing of nets, training or the engine.
"""
