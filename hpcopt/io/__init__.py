"""The trajectory file (parallel HDF5 through h5py's mpio driver) and its schema."""
