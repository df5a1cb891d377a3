"""Object temperatures from raw FLIR counts: the camera's Planck curve, corrected for the atmosphere, an external IR
window and the reflected surroundings.

The model is the one ExifTool's FLIR tags describe and Tattersall's Thermimage ``raw2temp`` implements. A body at
temperature ``T`` (kelvin) gives the counts ``R1 / (R2 * (exp(B / T) - F)) - O`` (Planck R1 R2 B F O). The counts
the camera measured are the object's, attenuated by the emissivity ``E``, twice by the atmosphere (transmission
``tau``, half the object distance on each side of the window) and once by the window (transmission ``W``), plus
what the reflected surroundings, the atmosphere and the window emit themselves::

    h2o   = humidity * exp(1.5587 + 0.06939 Ta - 0.00027816 Ta^2 + 0.00000068455 Ta^3)     (Ta: atmosphere, °C)
    tau   = X exp(-sqrt(d/2) (a1 + b1 sqrt(h2o))) + (1 - X) exp(-sqrt(d/2) (a2 + b2 sqrt(h2o)))
    obj   = raw / (E tau W tau)
            - (1 - E) / E                 * counts(T_reflected)
            - (1 - tau) / (E tau)         * counts(T_atmosphere)
            - (1 - W) / (E tau W)         * counts(T_window)        (the window reflects nothing)
            - (1 - tau) / (E tau W tau)   * counts(T_atmosphere)
    T_obj = B / log(R1 / (R2 (obj + O)) + F) - 273.15

Everything is computed in float64, once per distinct count value (a lookup table over the frame's count range:
the same numbers as per pixel, at a fraction of the cost), and stored as float32. Counts for which the curve has
no answer (at or below the Planck offset) become NaN.
"""

from __future__ import annotations

import math
from typing import Dict, Mapping, Optional, Tuple, Union

import numpy as np

#: Calibration keys, in the order ``unip info`` prints them; temperatures in °C, humidity a fraction, distance in m.
KEYS = ("emissivity", "object_distance", "reflected_temperature", "atmospheric_temperature",
        "ir_window_temperature", "ir_window_transmission", "relative_humidity",
        "planck_r1", "planck_r2", "planck_b", "planck_f", "planck_o",
        "atmospheric_trans_alpha1", "atmospheric_trans_alpha2", "atmospheric_trans_beta1",
        "atmospheric_trans_beta2", "atmospheric_trans_x")

KELVIN = 273.15


def problem(calibration: Mapping[str, float]) -> Optional[str]:
    """Why no temperature can be computed from ``calibration`` (a key missing, not finite or out of range), or None."""
    missing = [key for key in KEYS if key not in calibration]
    if missing:
        return f"calibration lacks {', '.join(missing)}"
    bad = [key for key in KEYS if not math.isfinite(calibration[key])]
    if bad:
        return f"calibration value {bad[0]} is {calibration[bad[0]]}"
    c = calibration
    if not 0.0 < c["emissivity"] <= 1.0:
        return f"emissivity {c['emissivity']:g} is not in (0, 1]"
    if c["object_distance"] < 0:
        return f"object distance {c['object_distance']:g} m is negative"
    if not 0.0 < c["ir_window_transmission"] <= 1.0:
        return f"IR window transmission {c['ir_window_transmission']:g} is not in (0, 1]"
    if not 0.0 <= c["relative_humidity"] <= 1.0:
        return f"relative humidity {c['relative_humidity']:g} is not a fraction in [0, 1]"
    if c["planck_r1"] == 0 or c["planck_r2"] == 0 or c["planck_b"] <= 0:
        return f"Planck constants R1 {c['planck_r1']:g}, R2 {c['planck_r2']:g}, B {c['planck_b']:g} are not a curve"
    temperatures = [c[key] for key in ("reflected_temperature", "atmospheric_temperature", "ir_window_temperature")]
    if min(temperatures) <= -KELVIN:
        return f"a temperature of the calibration ({min(temperatures):g} °C) is at or below absolute zero"
    try:
        tau = atmospheric_transmission(c)
        added = -float(object_counts(0.0, c))  # what the air, window and surroundings add
    except (OverflowError, ZeroDivisionError, ValueError) as err:
        return f"the calibration gives no usable model ({err})"
    if not (0.0 < tau and math.isfinite(tau) and math.isfinite(added)):
        return f"the calibration gives no usable model (atmospheric transmission {tau:g}, added counts {added:g})"
    return None


def atmospheric_transmission(calibration: Mapping[str, float]) -> float:
    """Transmission of the air over half the object distance (the model counts it on both sides of the window)."""
    c = calibration
    t = c["atmospheric_temperature"]
    h2o = c["relative_humidity"] * math.exp(1.5587 + 0.06939 * t - 0.00027816 * t ** 2 + 0.00000068455 * t ** 3)
    half = math.sqrt(c["object_distance"] / 2.0)
    water = math.sqrt(h2o)
    x = c["atmospheric_trans_x"]
    return (x * math.exp(-half * (c["atmospheric_trans_alpha1"] + c["atmospheric_trans_beta1"] * water))
            + (1.0 - x) * math.exp(-half * (c["atmospheric_trans_alpha2"] + c["atmospheric_trans_beta2"] * water)))


def _blackbody_counts(celsius: float, c: Mapping[str, float]) -> float:
    """Counts a black body at ``celsius`` gives on this camera."""
    return c["planck_r1"] / (c["planck_r2"] * (math.exp(c["planck_b"] / (celsius + KELVIN)) - c["planck_f"])) \
        - c["planck_o"]


def object_counts(raw: Union[float, np.ndarray], calibration: Mapping[str, float]) -> Union[float, np.ndarray]:
    """The counts the object alone would give (float64), after removing what the air, window and surroundings add."""
    c = calibration
    e, w = c["emissivity"], c["ir_window_transmission"]
    tau = atmospheric_transmission(c)
    atmosphere = _blackbody_counts(c["atmospheric_temperature"], c)
    added = ((1.0 - e) / e * _blackbody_counts(c["reflected_temperature"], c)
             + (1.0 - tau) / (e * tau) * atmosphere
             + (1.0 - w) / (e * tau * w) * _blackbody_counts(c["ir_window_temperature"], c)
             + (1.0 - tau) / (e * tau * w * tau) * atmosphere)
    return raw / (e * tau * w * tau) - added


def counts_to_celsius(counts: np.ndarray, calibration: Mapping[str, float]) -> np.ndarray:
    """Object temperature (°C, float32, same shape) of every pixel of the uint16 ``counts``; NaN where the Planck
    curve has no answer. Computed in float64 once per count value between the frame's minimum and maximum."""
    if counts.size == 0:
        return np.zeros(counts.shape, dtype=np.float32)
    low, high = int(counts.min()), int(counts.max())
    table = celsius_table(np.arange(low, high + 1, dtype=np.float64), calibration)
    return table[counts - np.uint16(low)] if low else table[counts]


def celsius_table(raw: np.ndarray, calibration: Mapping[str, float]) -> np.ndarray:
    """:func:`counts_to_celsius` of the float64 values ``raw`` (any shape), as float32."""
    c = calibration
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        obj = object_counts(raw, c)
        kelvin = c["planck_b"] / np.log(c["planck_r1"] / (c["planck_r2"] * (obj + c["planck_o"])) + c["planck_f"])
    celsius = kelvin - KELVIN
    celsius[~np.isfinite(celsius) | (kelvin <= 0)] = np.nan
    return celsius.astype(np.float32)


def with_overrides(calibration: Mapping[str, float], overrides: Mapping[str, Optional[float]]) -> Dict[str, float]:
    """``calibration`` with the values of ``overrides`` that are not None."""
    merged = dict(calibration)
    merged.update({key: float(value) for key, value in overrides.items() if value is not None})
    return merged


def linear_to_celsius(counts: np.ndarray, tlinear: float) -> np.ndarray:
    """Temperatures of a linear radiometric raster (FLIR's TLinear output: ``tlinear`` kelvin per count): float32
    ``counts × tlinear − 273.15``."""
    return (counts * np.float64(tlinear) - KELVIN).astype(np.float32)


def linear_calibration(counts: np.ndarray, tlinear: Optional[float]) -> Tuple[Dict[str, float], Optional[np.ndarray]]:
    """``(calibration, celsius)`` of a raster that carries no calibration of its own: ``({"tlinear": K}, its
    temperatures)`` when the caller states ``tlinear``, else ``({}, None)``."""
    if tlinear is None:
        return {}, None
    return {"tlinear": tlinear}, linear_to_celsius(counts, tlinear)
