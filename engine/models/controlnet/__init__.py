"""ControlNets: single-file layouts and detection (layout.py), strict offline loading into diffusers'
ControlNetModel (load.py), the residuals a sampler adds to the UNet (residuals.py), and tiny test files (tiny.py).
"""
