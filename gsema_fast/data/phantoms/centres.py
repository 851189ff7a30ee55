"""The centres of the built-in phantoms: how each one acquires and stores a volume.

The anatomy is drawn from one distribution for every centre (:mod:`gsema_fast.data.phantoms.anatomy`); only these
settings differ between centres (:mod:`gsema_fast.data.phantoms.acquisition` applies them). Centre D, index 3, is the
conventional unseen centre: its low contrast, strong blur, coarse grid, metal streaks and Rician noise lie outside the
range the other three span, so a model trained on A-C visibly loses accuracy there.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class CentreStyle:
    """How one centre acquires and stores a volume. Intensities are in units of full vessel opacification (1.0).
    Keywords only: a table of eighteen positional numbers says nothing about which is which."""

    name: str
    matrix: tuple[float, float, float]  # matrix per axis as a fraction of ``size``; the field of view is shared
    axcodes: str  # storage orientation of the voxel array: "RAS" or "LPS" (x and y flipped)
    psf_mm: float  # sigma of the Gaussian point-spread function
    background: float  # signal of non-opacified tissue
    contrast: float  # vessel signal above background
    distal_fade: float  # fraction of opacification lost in the thinnest vessels (contrast wash-in)
    sac_fill: float  # aneurysm opacification relative to the parent vessel (flow stagnation in the sac)
    gamma: float  # intensity transfer applied to the (non-negative) signal
    texture: float  # amplitude of smooth background structure (soft tissue, subtraction residue)
    bias: float  # amplitude (log scale) of a smooth multiplicative bias field
    noise: str  # "gaussian" | "poisson" | "rician" | "correlated"
    noise_level: float  # amplitude of that noise
    artifact: str  # "" | "streaks" (with a metal object) | "rings"
    artifact_level: float  # amplitude of the streaks or rings
    dtype: str  # storage type: "uint16" | "int16" | "float32"
    scale: float  # stored value = signal * scale + offset
    offset: float


CENTRES: tuple[CentreStyle, ...] = (
    CentreStyle(
        name="A",
        matrix=(1.0, 1.0, 1.0),
        axcodes="RAS",
        psf_mm=0.22,
        background=0.10,
        contrast=1.00,
        distal_fade=0.15,
        sac_fill=0.90,
        gamma=1.00,
        texture=0.04,
        bias=0.10,
        noise="gaussian",
        noise_level=0.035,
        artifact="",
        artifact_level=0.0,
        dtype="uint16",
        scale=3000.0,
        offset=100.0,
    ),
    CentreStyle(
        name="B",
        matrix=(0.875, 0.875, 0.875),
        axcodes="LPS",
        psf_mm=0.38,
        background=0.30,
        contrast=0.75,
        distal_fade=0.30,
        sac_fill=0.80,
        gamma=0.75,
        texture=0.04,
        bias=0.25,
        noise="poisson",
        noise_level=0.09,
        artifact="rings",
        artifact_level=0.05,
        dtype="int16",
        scale=2000.0,
        offset=-600.0,
    ),
    CentreStyle(
        name="C",
        matrix=(1.0, 1.0, 0.75),
        axcodes="RAS",
        psf_mm=0.30,
        background=0.06,
        contrast=1.00,
        distal_fade=0.25,
        sac_fill=0.70,
        gamma=1.50,
        texture=0.08,
        bias=0.18,
        noise="correlated",
        noise_level=0.07,
        artifact="",
        artifact_level=0.0,
        dtype="float32",
        scale=1.0,
        offset=0.0,
    ),
    CentreStyle(
        name="D",
        matrix=(0.75, 0.75, 0.75),
        axcodes="LPS",
        psf_mm=0.50,
        background=0.25,
        contrast=0.70,
        distal_fade=0.40,
        sac_fill=0.65,
        gamma=0.70,
        texture=0.10,
        bias=0.40,
        noise="rician",
        noise_level=0.07,
        artifact="streaks",
        artifact_level=0.15,
        dtype="int16",
        scale=1200.0,
        offset=0.0,
    ),
    CentreStyle(
        name="E",
        matrix=(0.8, 0.8, 1.0),
        axcodes="RAS",
        psf_mm=0.45,
        background=0.06,
        contrast=1.10,
        distal_fade=0.50,
        sac_fill=1.00,
        gamma=1.70,
        texture=0.05,
        bias=0.30,
        noise="gaussian",
        noise_level=0.08,
        artifact="rings",
        artifact_level=0.08,
        dtype="uint16",
        scale=4000.0,
        offset=0.0,
    ),
    CentreStyle(
        name="F",
        matrix=(0.9, 0.9, 0.9),
        axcodes="RAS",
        psf_mm=0.28,
        background=0.25,
        contrast=0.70,
        distal_fade=0.20,
        sac_fill=0.75,
        gamma=0.90,
        texture=0.16,
        bias=0.15,
        noise="correlated",
        noise_level=0.05,
        artifact="streaks",
        artifact_level=0.10,
        dtype="float32",
        scale=1.0,
        offset=-0.25,
    ),
)
