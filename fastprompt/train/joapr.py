"""JoAPR (Guo & Gu, CVPR 2024; ``yunncheng/JoAPR: trainers/joapr.py``) as a plug-in of any
learner: ``--joapr``.

Warm-up (the first ``joapr_warmup`` epochs): the run's loss on the given labels plus
``α₁ · mean_i Σ_c p_ic log p_ic`` (``joapr_confidence_penalty``: the negative entropy, which
penalises confident predictions).

Then, before each epoch, the current classifier scores each training image's view of that
epoch: its loss ``CE(z, y) + H(softmax z)``, min-max normalised over the training set and
averaged over the last ``LOSS_HISTORY`` (5) epochs, is fitted with a two-component 1-D Gaussian
mixture (``fit_two_gaussians``: sklearn's ``GaussianMixture`` EM with the official settings,
in torch). ``w``, the posterior of the lower-mean component, times the predicted probability
of the given label after the first such epoch, weighs each image's label. An image is kept
(labelled) where its averaged loss lies below the official intersection threshold of the two
components or where ``w`` exceeds the previous epoch's estimated noise rate (the official
self-updating threshold, 0.5 at first). Kept images train on ``sharpen(w e_y + (1 - w) p)``,
the others on ``sharpen(p)`` (``sharpen``: Dassl's ``p^T / Σ p^T``, ``T =
joapr_temperature``). Each step mixes its images with a permutation of themselves, ``λ x̂_a +
(1 - λ) x̂_b`` with ``λ = max(l, 1 - l)``, ``l ~ Beta(β, β)`` (``joapr_mixup_beta``), and
their targets alike; the loss is the run's loss (cross-entropy, or DSPT's double softmax) on the
mixed targets, through the fused op as an instance-wise table, plus ``α₂ · KL(u ‖ mean_i
p_i)`` (``joapr_prior_weight``: the uniform prior against the batch's mean prediction).

What differs from the official trainer (docs/label_noise.md):

* the mixup is on the cached image features (unit-normalised, then mixed), not on images;
* one shuffled pass over all training images per epoch, each batch holding kept and other
  images as they fall, where the official code draws a batch from each set per step and walks
  the larger set (so its epochs repeat the smaller set);
* the targets come from the classifier at the start of the epoch, from the same logits that
  score the split (the official code predicts each batch again with the current model); the
  split scores the epoch's augmented view (the cache holds no un-augmented training view);
* one network and one view per image, as the official scripts run it (``K_TRANSFORMS = 1``);
* the official trainer's loaders fail when every image is kept; here that epoch trains the kept
  images alone.
"""
from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from fastprompt.data.cache import FeatureCache
from fastprompt.train.config import TrainConfig
from fastprompt.train.nlprompt import selection_record

# The official settings: GaussianMixture(n_components=2, max_iter=10, tol=1e-2,
# reg_covar=5e-4), the loss averaged over the last 5 epochs (AVERAGE_LOSS), the noise-rate
# threshold starting at 0.5.
GMM_MAX_ITER = 10
GMM_TOL = 1e-2
GMM_REG_COVAR = 5e-4
LOSS_HISTORY = 5
FIRST_THRESHOLD = 0.5
# The random stream of the mixup draws (see fastprompt.train.epoch's streams).
MIXUP_STREAM = 3_000_017


# ---------------------------------------------------------------------------------------------
# The mixture


class TwoGaussians(NamedTuple):
    """A fitted two-component 1-D Gaussian mixture (float64): component weights, means and
    variances (2 each), and each sample's posterior (N x 2)."""
    weights: Tensor
    means: Tensor
    variances: Tensor
    posterior: Tensor


def _two_means_split(x: Tensor) -> Tensor:
    """The 0/1 labels of the optimal two-means partition of the 1-D values ``x`` (a threshold on
    the sorted values, the one of least within-cluster squares; what k-means converges to on
    such data): the deterministic stand-in of sklearn's k-means initialisation."""
    n = x.numel()
    if n < 2:
        return torch.zeros(n, dtype=torch.long, device=x.device)
    xs, order = torch.sort(x)
    k = torch.arange(1, n, device=x.device, dtype=x.dtype)  # left sizes 1 .. n-1
    left = torch.cumsum(xs, 0)[:-1]
    total = xs.sum()
    # within-cluster squares = Σx² - (Σ_left)²/k - (Σ_right)²/(n-k); Σx² is the same for all.
    score = left ** 2 / k + (total - left) ** 2 / (n - k)
    cut = int(torch.argmax(score)) + 1
    labels = torch.zeros(n, dtype=torch.long, device=x.device)
    labels[order[cut:]] = 1
    return labels


def _gaussian_parameters(x: Tensor, resp: Tensor, reg_covar: float):
    """sklearn's M-step for 1-D full covariances: ``(nk, means, variances)``."""
    nk = resp.sum(0) + 10 * torch.finfo(resp.dtype).eps
    means = (resp * x[:, None]).sum(0) / nk
    variances = (resp * (x[:, None] - means) ** 2).sum(0) / nk + reg_covar
    return nk, means, variances


def _log_resp(x: Tensor, weights: Tensor, means: Tensor, variances: Tensor):
    """sklearn's E-step: ``(log p(x) per sample, log posterior N x 2)``."""
    log_gauss = -0.5 * (math.log(2 * math.pi) + torch.log(variances)
                        + (x[:, None] - means) ** 2 / variances)
    weighted = log_gauss + torch.log(weights)
    norm = torch.logsumexp(weighted, dim=1)
    return norm, weighted - norm[:, None]


def fit_two_gaussians(x: Tensor, *, max_iter: int = GMM_MAX_ITER, tol: float = GMM_TOL,
                      reg_covar: float = GMM_REG_COVAR) -> TwoGaussians:
    """A two-component Gaussian mixture of the values ``x`` (N), as sklearn's
    ``GaussianMixture(n_components=2, max_iter, tol, reg_covar).fit(x).predict_proba(x)``
    computes it: responsibilities initialised from a two-means partition, then EM until the
    mean log-likelihood changes by less than ``tol`` or ``max_iter`` iterations; the posterior
    under the final parameters. In float64 on ``x``'s device; deterministic (sklearn's k-means
    initialisation is random, and reaches the same partition on two-cluster data)."""
    x = x.detach().double().reshape(-1)
    n = x.numel()
    resp = F.one_hot(_two_means_split(x), 2).to(x.dtype)
    nk, means, variances = _gaussian_parameters(x, resp, reg_covar)
    weights = nk / n
    lower_bound = -math.inf
    for _ in range(max_iter):
        previous = lower_bound
        norm, log_resp = _log_resp(x, weights, means, variances)
        nk, means, variances = _gaussian_parameters(x, log_resp.exp(), reg_covar)
        weights = nk / nk.sum()
        lower_bound = float(norm.mean())
        if abs(lower_bound - previous) < tol:
            break
    _, log_resp = _log_resp(x, weights, means, variances)
    return TwoGaussians(weights, means, variances, log_resp.exp())


def intersection_threshold(mean_clean: float, mean_noisy: float, var_clean: float,
                           var_noisy: float) -> float:
    """The official closed form of where the clean and the noisy component cross (``thres``
    in ``eval_train``), computed as the official code does: it names the variances ``std``.
    NaN where it has no real root (then no image passes it)."""
    a = var_noisy ** 2 - var_clean ** 2
    b = 2 * (mean_noisy * var_clean ** 2 - mean_clean * var_noisy ** 2)
    c = ((mean_clean * var_noisy) ** 2 - (mean_noisy * var_clean) ** 2
         + 2 * (var_noisy * var_clean) ** 2 * math.log(2 * var_clean / var_noisy + 1e-8))
    e = b ** 2 - 4 * a * c
    if e < 0:
        return math.nan
    return (-b + math.sqrt(e)) / (2 * a + 1e-10)


# ---------------------------------------------------------------------------------------------
# Targets, penalties, mixup


def sharpen(p: Tensor, temperature: float) -> Tensor:
    """Dassl's ``sharpen_prob``: ``p^T / Σ_c p^T`` per row (T > 1 sharpens)."""
    p = p.pow(temperature)
    return p / p.sum(1, keepdim=True)


def split_losses(logits: Tensor, labels: Tensor) -> Tensor:
    """What the split scores: each image's cross-entropy on its given label plus the entropy
    of its prediction (the official ``eval_train`` after warm-up)."""
    logp = torch.log_softmax(logits, dim=1)
    entropy = -(logp.exp() * logp).sum(1)
    return F.cross_entropy(logits, labels, reduction="none") + entropy


def confidence_penalty(logits: Tensor) -> Tensor:
    """The warm-up's penalty (official ``NegEntropy``): ``mean_i Σ_c p_ic log p_ic``."""
    logp = torch.log_softmax(logits.float(), dim=1)
    return (logp.exp() * logp).sum(1).mean()


def prior_penalty(logits: Tensor) -> Tensor:
    """``KL(u ‖ mean_i p_i)`` with u uniform over the C classes: the official regularisation
    ``Σ_c u_c log(u_c / p̄_c)``."""
    logits = logits.float()
    c = logits.shape[1]
    mean_p = torch.softmax(logits, dim=1).mean(0)
    return (torch.log(torch.tensor(1.0 / c, device=logits.device)) - torch.log(mean_p)).mean()


def mixup_draw(seed: int, epoch: int, step: int, n: int, beta: float,
               task: int = 0) -> tuple[float, Tensor]:
    """``(λ, permutation of n)`` of one step's mixup: ``λ = max(l, 1 - l)``, ``l ~ Beta(β,
    β)``, and the partner of each row. A pure function of (seed, epoch, step, task) (``task``:
    SoftCPT's task index, whose rows mix among themselves), so a resumed run and every rank
    draw the same."""
    key = hashlib.blake2b(f"{MIXUP_STREAM}:{seed}:{epoch}:{step}:{task}".encode(),
                          digest_size=8).digest()
    key = int.from_bytes(key, "little")
    lam = float(np.random.Generator(np.random.PCG64(key)).beta(beta, beta))
    g = torch.Generator().manual_seed(key >> 1)
    return max(lam, 1.0 - lam), torch.randperm(n, generator=g)


class JoAPREpoch(NamedTuple):
    """What an epoch's loss options carry for JoAPR (``options["joapr"]``): whether it is a
    warm-up epoch, its targets (M x C, by image) and kept images (M, bool, on the host; both
    None in warm-up), and what the mixup and the penalties need."""
    warmup: bool
    targets: Tensor | None
    kept: Tensor | None
    epoch: int
    seed: int
    task: int
    beta: float
    confidence_penalty: float
    prior_weight: float

    def mix(self, step: int, n: int) -> tuple[float, Tensor] | None:
        """The step's draw (None in warm-up: no mixup)."""
        if self.warmup:
            return None
        return mixup_draw(self.seed, self.epoch, step, n, self.beta, self.task)

    def penalty(self, logits: Tensor) -> Tensor:
        """The term added to the batch's loss, from its (mixed) logits."""
        if self.warmup:
            return self.confidence_penalty * confidence_penalty(logits)
        return self.prior_weight * prior_penalty(logits)


def mixed_features(images: Tensor, draw: tuple[float, Tensor] | None) -> Tensor:
    """The batch's image features as JoAPR's loss sees them: unit rows mixed by ``draw``
    (float32), or the features as they are (None: warm-up)."""
    if draw is None:
        return images
    lam, perm = draw
    x = F.normalize(images.float(), dim=-1)
    return lam * x + (1.0 - lam) * x[perm.to(x.device)]


def mixed_targets(rows: Tensor, draw: tuple[float, Tensor]) -> Tensor:
    """The batch's target rows (N x C) mixed by ``draw`` as its features are."""
    lam, perm = draw
    return lam * rows + (1.0 - lam) * rows[perm.to(rows.device)]


# ---------------------------------------------------------------------------------------------
# The per-epoch split


class JoAPRSelection:
    """JoAPR's per-epoch split of one cache's training images and its targets, with the state
    it carries from epoch to epoch: the normalised losses of the last ``LOSS_HISTORY`` epochs
    and the estimated noise rate (each by epoch, so that computing an epoch twice gives the same
    result; ``state``/``load_state`` carry them through a checkpoint)."""
    prefix = "joapr_"

    def __init__(self, config: TrainConfig, cache: FeatureCache, device: torch.device,
                 task: int = 0):
        self.config, self.cache, self.device, self.task = config, cache, device, task
        self.losses: dict[int, Tensor] = {}       # epoch -> normalised losses (M, float32, host)
        self.noise_rates: dict[int, float] = {}   # epoch -> the threshold the next epoch uses

    def _epoch(self, epoch: int, targets: Tensor | None = None,
               kept: Tensor | None = None) -> JoAPREpoch:
        c = self.config
        return JoAPREpoch(targets is None, targets, kept, epoch, c.seed, self.task,
                          c.joapr_mixup_beta, c.joapr_confidence_penalty, c.joapr_prior_weight)

    def epoch_options(self, options: dict, logits: Callable[[], Tensor],
                      epoch: int) -> tuple[dict, dict]:
        """The epoch's loss options (``joapr``: a ``JoAPREpoch``) and its record (the split's
        kept share, precision and recall, and the estimated noise rate; none in warm-up), from
        ``logits()``: the current classifier's logits of each training image's view this
        epoch (M x C, by image), called after warm-up only."""
        if epoch < self.config.joapr_warmup:
            return {**options, "joapr": self._epoch(epoch)}, {}
        z = logits().float()
        m = self.cache.num_train_images
        given = self.cache.train_labels[:m]
        y = given.to(z.device)
        w, kept, noise_rate = self.split(z, y, epoch)
        p = torch.softmax(z, dim=1)
        if epoch > self.config.joapr_warmup:  # after the first split: times p(given label)
            w = w * p.gather(1, y[:, None]).squeeze(1)
        onehot = F.one_hot(y, z.shape[1]).to(p.dtype)
        w = w.to(p.dtype)[:, None]
        refined = torch.where(kept[:, None], w * onehot + (1 - w) * p, p)
        targets = sharpen(refined, self.config.joapr_temperature)
        kept = kept.cpu()
        record = selection_record(self.prefix, kept, given, self.cache.train_clean_labels[:m])
        record[f"{self.prefix}noise_rate"] = noise_rate
        return {**options, "joapr": self._epoch(epoch, targets, kept)}, record

    def split(self, logits: Tensor, labels: Tensor, epoch: int) -> tuple[Tensor, Tensor, float]:
        """``(w, kept, noise rate)`` of epoch ``epoch`` from the training images' logits (M x
        C) and given labels: the clean component's posterior (M, float64), the kept images (M,
        bool) and the noise rate estimated this epoch (the next epoch's threshold on w). Stores
        this epoch's normalised losses and noise rate."""
        losses = split_losses(logits.float(), labels)
        span = losses.max() - losses.min()
        normalised = (losses - losses.min()) / span if span > 0 else torch.zeros_like(losses)
        self.losses[epoch] = normalised.cpu()
        recent = [self.losses[e] for e in range(epoch - LOSS_HISTORY + 1, epoch + 1)
                  if e in self.losses]
        averaged = torch.stack(recent).mean(0).to(logits.device)
        gmm = fit_two_gaussians(averaged)
        clean, noisy = int(gmm.means.argmin()), int(gmm.means.argmax())
        threshold = intersection_threshold(float(gmm.means[clean]), float(gmm.means[noisy]),
                                           float(gmm.variances[clean]),
                                           float(gmm.variances[noisy]))
        below = averaged.double() < threshold  # all False where threshold is NaN
        w = gmm.posterior[:, clean]
        m = w.numel()
        previous = self.noise_rates.get(epoch - 1, FIRST_THRESHOLD)
        noise_rate = (m - int((w > previous).sum())) / m
        self.noise_rates[epoch] = noise_rate
        self._forget_before(epoch - LOSS_HISTORY + 1)
        return w, below | (w > noise_rate), noise_rate

    def _forget_before(self, epoch: int) -> None:
        for e in [e for e in self.losses if e < epoch]:
            del self.losses[e]
        for e in [e for e in self.noise_rates if e < epoch]:
            del self.noise_rates[e]

    @staticmethod
    def batch_options(options: dict, samples: Tensor) -> dict:
        """The batch's rows of the epoch's targets as an instance-wise table of the batch
        (``smoothing`` 1: the targets alone), unmixed; the ``joapr`` entry stays for the mixup
        and the penalty (``Objective``)."""
        joapr = options["joapr"]
        if joapr.warmup:
            return options
        rows = joapr.targets[samples.to(joapr.targets.device)]
        return {**options, "soft_labels": rows, "smoothing": 1.0,
                "sample_index": torch.arange(rows.shape[0], device=rows.device)}

    # -- checkpoint

    def state(self) -> dict[str, Tensor]:
        """The carried state as tensors: the epochs, their normalised losses and noise
        rates."""
        epochs = sorted(self.losses)
        if not epochs:
            return {}
        return {"epochs": torch.tensor(epochs, dtype=torch.long),
                "losses": torch.stack([self.losses[e] for e in epochs]),
                "noise_rates": torch.tensor([self.noise_rates[e] for e in epochs],
                                            dtype=torch.float64)}

    def load_state(self, state: dict[str, Tensor]) -> None:
        """Restore ``state()`` (empty: nothing carried yet)."""
        self.losses, self.noise_rates = {}, {}
        if not state:
            return
        for e, losses, rate in zip(state["epochs"].tolist(), state["losses"],
                                   state["noise_rates"].tolist()):
            self.losses[e] = losses.float()
            self.noise_rates[e] = rate
