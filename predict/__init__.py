"""`probe predict`: a trained run's predictions for new, unlabelled images (the one command that goes back to images)."""
