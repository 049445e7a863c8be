"""Evaluation: the test report and TTA (`report`), evaluating a finished run (`evaluate`), attacks and robust accuracy
(`attacks`), where the model looked: Grad-CAM heat maps (`cam`)."""
