"""Bundle-local code of polyp_kdas_student.

Polyp-PVT networks, KDAS losses, the multi-scale KD step, the PraNet data layout, polyp metrics.
"""
