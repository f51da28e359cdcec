"""Bundle-local code of cardiac_qc_refinement: segmenter, QC autoencoder, M&Ms-2 data, QC/OoD logic, refinement."""
