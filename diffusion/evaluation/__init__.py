"""Sample-quality metrics: FID, Inception Score, k-NN precision/recall, feature networks.

Two feature networks: the FID Inception-v3 (weights converted from pytorch-fid's file,
see convert_inception.py) and a small Fashion-MNIST classifier the project trains itself
(`python -m diffusion.evaluation.train_classifier`), which works offline.
`python -m diffusion.evaluation.fid REF.npz SAMPLES.npz` scores two sample or statistics
files (sample_files.py: the layout of ADM's evaluator).
"""

from diffusion.evaluation.classifier import SmallClassifier, load_classifier, save_classifier
from diffusion.evaluation.evaluate import (FeatureNetwork, classifier_features,
                                           compute_features, evaluate_samples,
                                           inception_features, reference_stats)
from diffusion.evaluation.frechet import (FeatureStats, frechet_distance, load_stats,
                                          save_stats, stats_from_features)
from diffusion.evaluation.inception import InceptionV3FID
from diffusion.evaluation.inception_score import inception_score, inception_score_from_logits
from diffusion.evaluation.inception_weights import (load_inception_weights,
                                                    pytorch_fid_state_dict_shapes,
                                                    state_dict_to_variables)
from diffusion.evaluation.precision_recall import precision_recall

__all__ = [
    "FeatureNetwork", "FeatureStats", "InceptionV3FID", "SmallClassifier",
    "classifier_features", "compute_features", "evaluate_samples", "frechet_distance",
    "inception_features", "inception_score", "inception_score_from_logits",
    "load_classifier", "load_inception_weights", "load_stats", "precision_recall",
    "pytorch_fid_state_dict_shapes", "reference_stats", "save_classifier", "save_stats",
    "state_dict_to_variables", "stats_from_features",
]
