"""Bundle-local code of liver_ct_mri_transfer: the U-Net, transfer modes, data layouts, slice sampling."""
