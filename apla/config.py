"""Run configuration of APLA (Yao et al., AAAI 2024): the loss weights of Eqs. 18 and 20, the VGT variant
(Table 1) and the ablation switches of Table 3.

The paper gives no values for alpha, beta, gamma or lambda; ours are documented below.
"""

from dataclasses import asdict, dataclass

from apla.vgt import VARIANTS

# Table 3's rows -> (vgt on, discriminator on, hyper-loss on)
ABLATIONS = {
    "full": (True, True, True),
    "w/o discriminator": (True, False, True),
    "w/o vgt&discriminator": (False, False, True),
    "w/o hyper-loss&discriminator": (True, False, False),
    "w/o vgt&hyper-loss": (False, True, False),
}


@dataclass
class APLAConfig:
    """Weights and switches of APLA's objective (Eqs. 4-6, 16-20)."""

    alpha: float = 1.0  # Eq. 18, weight of L_MSE; 1 keeps the plain diffusion loss at full strength (ours)
    beta: float = 0.1  # Eq. 18, weight of L_L1 (ours; the paper gives none)
    gamma: float = 0.1  # Eq. 18, weight of L_per (ours; the paper gives none)
    lam: float = 0.01  # Eq. 20, lambda, weight of the generator's adversarial term L_g (ours)
    vgt: str = "pure"  # "pure" | "hyper" | "pure-en" | "hyper-en" | "none"; the paper's experiments use "pure"
    use_discriminator: bool = True  # False: Table 3's "w/o Discriminator", no lambda * L_g term
    use_hyper_loss: bool = True  # False: Table 3's "w/o Hyper-Loss", plain MSE (Eq. 6, or Eq. 5 without VGT)
    saturating: bool = True  # L_g as written in the paper, E[log(1 - D(G))]; False: non-saturating -log D(G)
    perceptual_weights: str | None = None  # torchvision-layout VGG16 file (.safetensors/.pth); None: seeded init

    def __post_init__(self):
        if self.vgt not in VARIANTS + ("none",):
            raise ValueError(f"APLAConfig.vgt={self.vgt!r}; expected one of {VARIANTS + ('none',)}")
        for name in ("alpha", "beta", "gamma", "lam"):
            if getattr(self, name) < 0:
                raise ValueError(f"APLAConfig.{name}={getattr(self, name)} must be >= 0")

    @property
    def use_vgt(self) -> bool:
        """False for Table 3's "w/o VGT" (phi = 0), i.e. vgt == "none"."""
        return self.vgt != "none"

    @classmethod
    def ablation(cls, name: str, vgt: str = "pure", **overrides) -> "APLAConfig":
        """A config for one row of Table 3 (names in `ABLATIONS`), e.g. APLAConfig.ablation("w/o discriminator")."""
        if name not in ABLATIONS:
            raise ValueError(f"unknown ablation {name!r}; expected one of {list(ABLATIONS)}")
        with_vgt, with_d, with_hyper = ABLATIONS[name]
        return cls(vgt=vgt if with_vgt else "none", use_discriminator=with_d, use_hyper_loss=with_hyper, **overrides)

    def to_dict(self) -> dict:
        return asdict(self)
