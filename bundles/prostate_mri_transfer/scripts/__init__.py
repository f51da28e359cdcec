"""Bundle-local code of prostate_mri_transfer: what MONAI and smp do not provide."""
