"""Offline sample data: real MNI152 anatomy from the nilearn wheel, derived tissue labels and a
simulated second MRI contrast (clearly named ``*_simulated``)."""
