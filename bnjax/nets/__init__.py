"""The nets: the article's ConvNet and the BN paper's MLP (models.py), convolutions as matrix
products (conv.py), the LSTM and BN-LSTM (recurrent.py), the net in NNX (nnx_model.py), weights
to and from PyTorch and Keras (convert.py). Import bnjax.bn and bnjax.support.
"""
