"""The training engine shared by pretrain and train-dp, batch samplers and the DP-softmax machinery."""
