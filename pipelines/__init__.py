"""The batch pipeline behind ``painn-batch`` (HDF5 in, energies and forces out)."""
