"""The models: the DFlash draft (and its checkpoint IO), target loading and feature extraction, prompts, sampling."""
