"""Site profiles: the operating point a hospital measured on its own films, chosen per film, the model untouched.

A model's threshold is fitted on its validation split, whose normals come from one or two
origins; at another hospital the same threshold calls a different share of normal films COVID-19
(docs/benchmarks.md). A hospital validates before use, so that is the product's path:
``covidxray site add NAME --normals DIR`` runs the site's own normal films through the model and
stores the lowest threshold at which at least the target share of them is called normal, with
what it costs (`covidxray.onboarding.onboard_site`). With ``--refit-head`` the site also gets a head of its own:
the model's last layer refitted with the site's normals added to the training films' features the model keeps
(`covidxray.headfit.site_head`), which then gives its films' P(COVID-19). The profile is a JSON file in a registry
folder, one per site; the weights and ``model.json`` are never rewritten.

Per film, a profile is chosen by name (``predict --site``, the API's ``site`` parameter) or, in the
DICOM listener, by the film's InstitutionName or StationName or the sender's calling AE title
(`SiteRegistry.match`). A film of no known site keeps the model's own threshold and its answer says
``site not onboarded``.

Example:
    >>> registry = SiteRegistry("/var/lib/covidxray/sites")        # doctest: +SKIP
    >>> profile = registry.get("st-marys", weights_sha256=sha)       # doctest: +SKIP
    >>> profile.threshold                                            # doctest: +SKIP
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

from .config import settings
from .errors import CheckpointError, DataError
from .utils import atomic_write_json, read_json_object

if TYPE_CHECKING:  # NumPy only where a site's head is used: `covidxray --help` loads this module
    import numpy as np

__all__ = ["FORMAT", "MIN_NORMALS", "NOT_ONBOARDED", "SiteMatcher", "SiteProfile", "SiteRegistry", "check_target", "default_sites_folder",
           "normalise", "site_decision", "site_fields", "site_threshold"]

FORMAT = "covidxray-site-1"  # the ``format`` field of a profile file
MIN_NORMALS = 20  # answered normal films below which no threshold is set: one film would move it by 5 %
HEAD_BOUND = 1e6  # largest weight or bias a site's head may hold (a fitted head's are under 10)
NOT_ONBOARDED = "site not onboarded: the model's default threshold applies (covidxray site add NAME --normals DIR)"
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")


def normalise(text: str | None) -> str:
    """A header value or name as it is matched: case and runs of whitespace ignored, ends stripped."""
    return " ".join(str(text or "").split()).casefold()


def _check_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise DataError(f"site name {name!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', starting with a "
                        "letter or digit (it names the profile file)")
    return name


def check_target(target_specificity: float) -> float:
    """``target_specificity`` if it is in [0.5, 1), else `DataError` (checked before any film is scored)."""
    if not 0.5 <= target_specificity < 1.0:
        raise DataError(f"the target specificity must be in [0.5, 1), got {target_specificity}")
    return target_specificity


def site_threshold(normal_probs: Sequence[float], target_specificity: float, floor: float | None = None) -> float:
    """The lowest threshold, not below ``floor``, at which at least ``target_specificity`` of ``normal_probs`` stay
    below it (are called normal).

    ``floor`` is the model's own threshold unless the site asks otherwise: below it a site would
    buy sensitivity it has not measured with specificity it has (its normals score low, so the
    quantile falls), and the model's threshold already carries its validated sensitivity.

    Raises:
        DataError: a target outside [0.5, 1), or fewer than `MIN_NORMALS` films.
    """
    check_target(target_specificity)
    probs = sorted(float(p) for p in normal_probs)
    if len(probs) < MIN_NORMALS:
        raise DataError(f"{len(probs)} answered normal films; at least {MIN_NORMALS} are needed to set a threshold")
    # The k-th smallest probability is the last one that must stay under the threshold (k <= n: the target is below 1).
    k = math.ceil(target_specificity * len(probs))
    return max(floor or 0.0, min(1.0, math.nextafter(probs[k - 1], math.inf)))


@dataclass(frozen=True)
class SiteProfile:
    """One onboarded site: its threshold for one model's weights, how it is recognised, and what it cost.

    ``cost`` is what `covidxray.onboarding.onboard_site` measured: specificity on the site's normal
    films before and after, sensitivity on its COVID-19 films if it gave some, and sensitivity and
    specificity on the model's validation split at both thresholds, with 95 % CIs.
    """

    name: str  # lower-case; names the file NAME.json
    threshold: float  # P(COVID-19) at or above which a film of this site is called COVID-19
    target_specificity: float  # the share of the site's normals the threshold was set to call normal
    rule: str  # how the threshold was chosen, in words
    weights_sha256: str  # the model weights the threshold belongs to; refused with any other
    model: str = ""  # architecture@input size, for people
    default_threshold: float | None = None  # the model's own threshold when the site was onboarded
    institutions: tuple[str, ...] = ()  # DICOM InstitutionName values of this site
    stations: tuple[str, ...] = ()  # DICOM StationName values
    ae_titles: tuple[str, ...] = ()  # calling AE titles of its senders
    cost: dict[str, Any] = field(default_factory=dict)
    created_at: str = ""  # ISO 8601 UTC
    # The site's own head (`covidxray.headfit.site_head`, ``site add --refit-head``): ``weight`` (one per feature) and
    # ``bias`` of the logit of the site's P(COVID-19); None: the model's head decides, at the site's threshold.
    head: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check_name(self.name)
        if not (0.0 <= self.threshold <= 1.0):
            raise DataError(f"site {self.name}: threshold {self.threshold} is not a probability")
        if self.head is not None:
            import numpy as np

            problem = f"site {self.name}: its head needs a list of weights and a bias, finite and at most {HEAD_BOUND:g} in size"
            if not isinstance(self.head, dict):
                raise DataError(problem)
            try:
                w, b = np.asarray(self.head.get("weight", ()), np.float64), float(self.head.get("bias", "nan"))
            except (TypeError, ValueError):
                raise DataError(problem) from None
            # Bounded, so that a film's logit stays finite (a NaN probability would read as "normal").
            if w.ndim != 1 or not len(w) or not (np.abs(w) <= HEAD_BOUND).all() or not abs(b) <= HEAD_BOUND:
                raise DataError(problem)

    def probability(self, features: np.ndarray) -> np.ndarray | float:
        """P(COVID-19) under the site's own head, for one film's features ``(D,)`` or many ``(N, D)``."""
        import numpy as np

        weight, bias = self.head_arrays()
        if np.shape(features)[-1] != len(weight):
            raise CheckpointError(f"site {self.name}: its head takes {len(weight)} features, the model gives "
                                  f"{np.shape(features)[-1]}")
        p = 1.0 / (1.0 + np.exp(-(np.asarray(features, np.float64) @ weight + bias)))
        return float(p) if np.ndim(p) == 0 else p

    def head_arrays(self) -> tuple[np.ndarray, float]:
        """The site head's weight vector and bias (`DataError` for a site without one)."""
        if self.head is None:
            raise DataError(f"site {self.name} has no head of its own (onboarded without --refit-head)")
        import numpy as np

        return np.asarray(self.head["weight"], np.float64), float(self.head["bias"])

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict[str, Any], path: Path) -> "SiteProfile":
        """The profile in a parsed profile file (``path`` names it in errors)."""
        try:
            values = {k: v for k, v in obj.items() if k != "format"}
            for key in ("institutions", "stations", "ae_titles"):
                values[key] = tuple(values.get(key) or ())
            return cls(**values)
        except (TypeError, DataError) as e:
            raise DataError(f"{path}: not a usable site profile ({e})") from None

    def check_weights(self, weights_sha256: str | None, path: str | os.PathLike | None = None) -> "SiteProfile":
        """``self`` if it was made for ``weights_sha256``; otherwise `CheckpointError` naming the profile file."""
        if weights_sha256 != self.weights_sha256:
            where = path or f"site {self.name}"
            raise CheckpointError(
                f"{where}: this site profile was made for the model with weights sha256 {self.weights_sha256[:12]}..., "
                f"not for the one loaded ({(weights_sha256 or 'unknown')[:12]}...); its threshold means nothing for "
                f"other weights: onboard the site again (covidxray site add {self.name} --normals DIR --model RUN)")
        return self


def site_decision(site: SiteProfile | None, answered: bool = True) -> str | None:
    """How ``site`` decides a film: "head" (its own head gives an answered film's P(COVID-19)), "threshold" (the
    model's P(COVID-19) at the site's threshold), or None (no site: the model's threshold)."""
    return None if site is None else "head" if site.head is not None and answered else "threshold"


def site_fields(site: SiteProfile | None, answered: bool = True) -> dict[str, Any]:
    """The site fields of an answer (`covidxray.predictor.Prediction`): which profile decided, or "not onboarded";
    a site with a head of its own says so in the note of an answered film (its P(COVID-19) is that head's)."""
    if site is None:
        return {"site": None, "site_onboarded": False, "note": NOT_ONBOARDED}
    return {"site": site.name, "site_onboarded": True, "note": None if site_decision(site, answered) != "head" else
            f"decided by site {site.name}'s own head, refitted on {site.head.get('site_films', '?')} of its normal films"}


def default_sites_folder() -> Path:
    """``$COVIDXRAY_SITES`` if set, else ``~/.local/share/covidxray/sites``."""
    return Path(settings().sites or Path.home() / ".local" / "share" / "covidxray" / "sites")


class SiteRegistry:
    """A folder of site profiles, ``NAME.json`` each (written atomically).

    Args:
        folder: the registry; None: `default_sites_folder`. Created on the first `save`.
    """

    def __init__(self, folder: str | os.PathLike | None = None):
        self.folder = Path(folder) if folder else default_sites_folder()
        if self.folder.exists() and not self.folder.is_dir():
            raise DataError(f"{self.folder}: the site registry must be a folder")

    def path(self, name: str) -> Path:
        return self.folder / f"{_check_name(name)}.json"

    def names(self) -> list[str]:
        return sorted(p.stem for p in self.folder.glob("*.json")) if self.folder.is_dir() else []

    def save(self, profile: SiteProfile) -> Path:
        path = self.path(profile.name)
        atomic_write_json(path, profile.to_json())
        return path

    def load(self, name: str) -> SiteProfile:
        """The profile called ``name``; `DataError` naming the registry and the known sites when there is none."""
        path = self.path(name)
        if not path.is_file():
            known = ", ".join(self.names()) or "none"
            raise DataError(f"no site {name!r} in {self.folder} (onboarded sites: {known}); "
                            f"onboard it with: covidxray site add {name} --normals DIR")
        profile = SiteProfile.from_json(read_json_object(path, FORMAT, "site profile", DataError), path)
        if profile.name != name:  # a renamed or copied file: its threshold belongs to another site
            raise DataError(f"{path}: holds the profile of site {profile.name!r}, not {name!r}; rename it "
                            f"{profile.name}.json or onboard {name} with: covidxray site add {name} --normals DIR")
        return profile

    def get(self, name: str, weights_sha256: str | None) -> SiteProfile:
        """The profile called ``name``, checked to be made for the model with ``weights_sha256``."""
        return self.load(name).check_weights(weights_sha256, self.path(name))

    def all(self, weights_sha256: str | None) -> list[SiteProfile]:
        """Every profile, each checked against ``weights_sha256`` (one made for other weights is an error)."""
        return [self.get(name, weights_sha256) for name in self.names()]

    def check_claims(self, name: str, institutions: Sequence[str] = (), stations: Sequence[str] = (),
                     ae_titles: Sequence[str] = ()) -> None:
        """`DataError` when another site of the registry already claims one of these InstitutionName, StationName
        or calling AE title values: the listener would refuse to start with both (`SiteMatcher`)."""
        probe = SiteProfile(name, 0.0, 0.5, "", "", institutions=tuple(institutions), stations=tuple(stations),
                            ae_titles=tuple(ae_titles))
        SiteMatcher([*(self.load(other) for other in self.names() if other != name), probe])

    def remove(self, name: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            raise DataError(f"no site {name!r} in {self.folder}")
        path.unlink()
        return path


class SiteMatcher:
    """Finds a film's site from its DICOM header: InstitutionName, then StationName, then the calling AE title.

    Built once from a registry's profiles (all checked against the model's weights at start-up, so a
    stale profile stops the listener with a message instead of silently giving wrong thresholds).

    Raises:
        DataError: two sites claim the same institution, station or AE title.
    """

    def __init__(self, profiles: Sequence[SiteProfile]):
        self.profiles = list(profiles)
        self._by: dict[str, dict[str, SiteProfile]] = {"institution": {}, "station": {}, "ae": {}}
        for profile in self.profiles:
            for kind, values in (("institution", profile.institutions), ("station", profile.stations),
                                 ("ae", profile.ae_titles)):
                for value in values:
                    key = normalise(value)
                    other = self._by[kind].get(key)
                    if other is not None and other.name != profile.name:
                        raise DataError(f"sites {other.name} and {profile.name} both claim the {kind} {value!r}")
                    self._by[kind][key] = profile

    def match(self, institution: str | None = None, station: str | None = None,
              calling_ae: str | None = None) -> SiteProfile | None:
        """The site whose rules match (the first of institution, station, AE title that does), or None."""
        for kind, value in (("institution", institution), ("station", station), ("ae", calling_ae)):
            key = normalise(value)
            if key and key in self._by[kind]:
                return self._by[kind][key]
        return None
