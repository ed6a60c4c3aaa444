"""The pipeline's stages, each callable from Python: align, pretrain, imprint, index, train_dp, evaluate, verify."""
