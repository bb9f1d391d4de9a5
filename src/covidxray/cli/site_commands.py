"""``covidxray site {add,list,show,remove}``: onboard a hospital on its own films, without touching the model."""

from __future__ import annotations

import argparse
import json

from ..errors import DataError
from ..sites import SiteProfile, SiteRegistry

__all__ = ["register", "sites_flag"]


def sites_flag(parser: argparse.ArgumentParser) -> None:
    """The ``--sites DIR`` option every command that reads the site registry shares."""
    parser.add_argument("--sites", metavar="DIR",
                        help="site registry folder (default $COVIDXRAY_SITES, else ~/.local/share/covidxray/sites)")


def register(sub: argparse._SubParsersAction) -> None:
    """Add ``site`` and its subcommands to the top-level subparsers."""
    site = sub.add_parser("site", help="site profiles: a hospital's own operating point, measured on its own films")
    actions = site.add_subparsers(dest="site_command", required=True, metavar="ACTION")
    add = actions.add_parser("add", help="onboard a site: set its threshold on its normal films and measure the cost")
    add.add_argument("name", help="site name (lower-case letters, digits, . _ -)")
    add.add_argument("--normals", required=True, metavar="DIR",
                     help="the site's normal films (a folder, searched recursively, or a manifest); at least 20 answered")
    add.add_argument("--covid", metavar="DIR", help="the site's COVID-19 films, if it has some: sensitivity there is measured")
    add.add_argument("--target-specificity", type=float, default=0.95,
                     help="share of the site's normals to call normal (default 0.95)")
    add.add_argument("--allow-lower", action="store_true",
                     help="let the threshold fall below the model's own (a site whose normals score low); by default a "
                          "site only ever gets a stricter threshold")
    add.add_argument("--institution", action="append", default=[], metavar="NAME",
                     help="DICOM InstitutionName of the site's films (repeatable; case and spaces ignored)")
    add.add_argument("--station", action="append", default=[], metavar="NAME", help="DICOM StationName (repeatable)")
    add.add_argument("--ae", action="append", default=[], metavar="AE_TITLE",
                     help="calling AE title of the site's senders (repeatable)")
    add.add_argument("--model", help="run folder or model.json (default: the bundled model)")
    add.add_argument("--refit-head", action="store_true",
                     help="also give the site a head of its own: the model's last layer refitted with the site's normals "
                          "added to the training films' features the model keeps (its threshold still from validation "
                          "COVID-19 films); needs a model whose head was refitted (covidxray refit-head), as the "
                          "bundled one's was")
    add.add_argument("--validation", action=argparse.BooleanOptionalAction, default=True,
                     help="also measure the cost on the model's validation split (default; needs its training data, "
                          "minutes on a CPU); --no-validation measures on the site's films only")
    add.add_argument("--cache-dir", help="decoded-image cache for the validation split")
    add.add_argument("--replace", action="store_true", help="overwrite an existing profile of that name")
    sites_flag(add)
    add.set_defaults(func=cmd_site_add)

    ls = actions.add_parser("list", help="onboarded sites, one a line")
    sites_flag(ls)
    ls.set_defaults(func=cmd_site_list)
    show = actions.add_parser("show", help="one site's profile as JSON")
    show.add_argument("name")
    sites_flag(show)
    show.set_defaults(func=cmd_site_show)
    rm = actions.add_parser("remove", help="delete a site's profile (its films then get the model's default threshold)")
    rm.add_argument("name")
    sites_flag(rm)
    rm.set_defaults(func=cmd_site_remove)


def cmd_site_add(args: argparse.Namespace) -> int:
    from ..onboarding import onboard_site

    registry = SiteRegistry(args.sites)
    if registry.path(args.name).exists() and not args.replace:
        raise DataError(f"{registry.path(args.name)}: site {args.name!r} is already onboarded; pass --replace to redo it")
    registry.check_claims(args.name, args.institution, args.station, args.ae)  # before minutes of scoring films
    profile = onboard_site(args.name, args.normals, args.covid, args.target_specificity, model=args.model,
                           institutions=args.institution, stations=args.station, ae_titles=args.ae,
                           allow_lower=args.allow_lower, validation=args.validation, cache_dir=args.cache_dir,
                           refit_head=args.refit_head)
    path = registry.save(profile)
    print("\n".join(summary(profile)))
    print(f"wrote {path} (the model is unchanged); use it with: covidxray predict --site {profile.name} ...")
    return 0


def summary(profile: SiteProfile) -> list[str]:
    """A few readable lines: the threshold, and what it costs where it was measured (positive class: COVID-19)."""
    from ..metrics import format_ci  # scikit-learn: imported when a command runs, never for --help

    cost, before = profile.cost, profile.default_threshold
    normals = cost["site_normals"]
    lines = [f"site {profile.name}: threshold {before:.4f} (model) -> {profile.threshold:.4f} ({profile.rule})",
             f"  site normals: {normals['answered']} answered of {normals['files']} ({normals['not_answered']} not answered, "
             f"{normals['unreadable']} unreadable); specificity {format_ci(normals['specificity_before'])} -> "
             f"{format_ci(normals['specificity_after'])}"]
    if profile.head is not None:
        held = normals.get("specificity_held_out")
        lines.append(f"  site head: refitted with {profile.head['site_films']} of its normals; held-out specificity "
                     + (f"(each fifth under a head fitted without it) {format_ci(held)}" if held else
                        "not measured (25 films or more needed)"))
    if "site_covid" in cost:
        c = cost["site_covid"]
        lines.append(f"  site COVID-19 films: {c['answered']} answered; sensitivity {format_ci(c['sensitivity_before'])} -> "
                     f"{format_ci(c['sensitivity_after'])}")
    val = cost.get("validation", {})
    if "skipped" in val:
        lines.append(f"  model's validation split: not measured ({val['skipped']})")
    else:
        lines.append(f"  model's validation split ({val['films']} films, {val['covid']} COVID-19): sensitivity "
                     f"{format_ci(val['before'].get('sensitivity'))} -> {format_ci(val['after'].get('sensitivity'))}, "
                     f"specificity {format_ci(val['before'].get('specificity'))} -> {format_ci(val['after'].get('specificity'))}")
    rules = [f"{kind} {', '.join(values)}" for kind, values in (("institution", profile.institutions),
             ("station", profile.stations), ("AE title", profile.ae_titles)) if values]
    lines.append(f"  listener matches: {'; '.join(rules) if rules else 'none (chosen by name only: --site / ?site=)'}")
    return lines


def cmd_site_list(args: argparse.Namespace) -> int:
    registry = SiteRegistry(args.sites)
    names = registry.names()
    for name in names:
        p = registry.load(name)
        print(f"{p.name}\tthreshold {p.threshold:.4f}\ttarget specificity {p.target_specificity:g}\tmodel {p.model} "
              f"({p.weights_sha256[:12]})\tcreated {p.created_at}")
    if not names:
        print(f"# no site onboarded in {registry.folder} (covidxray site add NAME --normals DIR)")
    return 0


def cmd_site_show(args: argparse.Namespace) -> int:
    print(json.dumps(SiteRegistry(args.sites).load(args.name).to_json(), indent=2))
    return 0


def cmd_site_remove(args: argparse.Namespace) -> int:
    print(f"removed {SiteRegistry(args.sites).remove(args.name)}")
    return 0
