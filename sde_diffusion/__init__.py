"""sde_diffusion: continuous-time score-based diffusion in JAX."""

from .distributions import MultivariateNormal, Normal
from .linear import AbstractLinearSDE, CriticallyDampedLangevin, LinearSDE
from .noise import AbstractNoise, ElementwiseNoise, MatrixNoise
from .schedule import (
    VE,
    VP,
    AbstractLinearBeta,
    AbstractScheduleSDE,
    AbstractVariancePreserving,
    CosineVP,
    EDM,
    RectifiedFlow,
    ScheduleSDE,
    SubVP,
)
from .sde import SDE, AbstractSDE

# -- modules added by parallel work: keep one import line each below --
from .oracles import GaussianMixture
from .ddpm import DDPM
from .metrics import sliced_wasserstein
from .reverse import ProbabilityFlowODE, ReverseSDE
from .sample import AbstractSamplingMethod, ProbabilityFlow, ReverseDiffusion, SampleInfo, sample
from .simulate import simulate
from .grids import AbstractTimeGrid, GivenTimes, KarrasSigma, QuadraticTime, UniformLogSNR, UniformTime, UniformTimeOf
from .parametrization import AbstractPrediction, Denoiser, EDMPreconditioned, Network, Noise, Score, Velocity, noise_level, with_label
from .multistep import DDIM, DEIS, AbstractMultistep, DPMSolverPP, DPMSolverPP2MSDE, UniPC
from .singlestep import AbstractTwoStage, DPMSolverPP2S, EDMHeun, Evaluation
from .predictor_corrector import PredictorCorrector
from .grid_optimizer import GridOptimization, optimize_grid
from .adaptive import AdaptiveDPMSolverPP
from .data import ArrayDataset, Dataset, IteratorDataset, as_dataset, checkerboard, digits, gaussian_mixture, gaussian_mixture_oracle, moons, rings, swiss_roll, train_test_split
from .quality import DigitsClassifier, digits_classifier, digits_frechet_distance, digits_split, frechet_distance, train_digits_classifier
from .training import TrainConfig, TrainResult, restore_model, tile_images, train
from .nets import MLP, FourierEmbedding, SinusoidalEmbedding, UNet
from .losses import AbstractTimeDistribution, AbstractWeighting, DenoisingScoreMatching, EDMWeighting, LabelDropout, LikelihoodWeighting, LinearDenoisingScoreMatching, LogNormalNoise, LogSNRTimes, MinSNRWeighting, NoiseWeighting, NoisyClassification, SlicedScoreMatching, UniformTimes, UnitWeighting
from .likelihood import AbstractProbe, AbstractTraceEstimator, ExactTrace, GaussianProbe, Hutchinson, LikelihoodInfo, RademacherProbe, bits_per_dim, dequantize, log_likelihood
from .guidance import ClassifierFreeGuidance, ClassifierGuidance, Inpainting, LinearInverseProblem
from .resampling import Resampling
