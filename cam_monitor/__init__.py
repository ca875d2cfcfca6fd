"""cam_monitor: Grad-CAM monitoring for training image classifiers."""
__version__ = "0.1.0"
