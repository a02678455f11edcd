"""nanoGPT-style configuration: plain-Python config files, then `--key=value` overrides.

    nanogpt-train configs/train_shakespeare_char.py --batch_size=32 --compile=False
    nanogpt-train configs/train_shakespeare_char.py --help    # every key, its type, default and meaning

A command defines its keys once, as `Keys`: per group, each key's default and a one-line description. The
defaults' types are what values are checked against, and `-h`/`--help` prints the same definition, so the
help cannot drift from the keys.

A config file is executed as Python; every top-level name it assigns (not
starting with `_`) must be a known key. An override's value is parsed with
`ast.literal_eval` (falling back to a bare string for string keys). Unlike
nanoGPT, an unknown key, a wrong type or a stray `=` is a one-line error that
names the key.
"""
import ast
import difflib
import sys
import types

from nanogpt.errors import UserError

HELP = ("-h", "--help")


class ConfigError(UserError, ValueError):
    pass


class Keys(dict):
    """A command's config keys: {key: default}, what configure() type-checks against, with each key's group and
    one-line description, what --help prints.

        DEFAULTS = Keys("nanogpt-train", __doc__, {"I/O": dict(out_dir=("out", "where checkpoints go"), ...)})

    `doc`'s first paragraph (the module docstring's) heads the help."""

    def __init__(self, prog, doc, groups):
        super().__init__()
        self.prog, self.summary = prog, " ".join(doc.strip().split("\n\n")[0].split())
        self.about = {}  # key -> (group, description)
        for group, keys in groups.items():
            for key, (default, description) in keys.items():
                if key in self:
                    raise ValueError(f"config key {key!r} is defined twice")
                self[key] = default
                self.about[key] = (group, description)


def _type_name(default):
    return "VALUE" if default is None else type(default).__name__.upper()


def help_text(keys, config):
    """The usage line, then every key by group: --key=TYPE, what it does, its value in `config` (the defaults
    after the arguments that came before --help)."""
    width = min(30, max(len(f"--{k}={_type_name(v)}") for k, v in keys.items()))
    lines = [f"usage: {keys.prog} [CONFIG.py ...] [--key=value ...] [-h]", "", keys.summary, "",
             "Config files (plain Python, assigning keys) and --key=value overrides apply left to right."]
    group = None
    for key, default in keys.items():
        if keys.about[key][0] != group:
            group = keys.about[key][0]
            lines += ["", f"{group}:"]
        lines.append(f"  {f'--{key}={_type_name(default)}':<{width}}  {keys.about[key][1]} (default: {config[key]!r})")
    return "\n".join(lines)


def _check_type(key, value, default, source):
    if default is None or value is None:
        return value
    if isinstance(default, bool) or isinstance(value, bool):
        ok = isinstance(value, bool) and isinstance(default, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float))
        value = float(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        raise ConfigError(f"{source}: {key} must be {type(default).__name__} (like {default!r}), "
                          f"got {type(value).__name__} {value!r}")
    return value


def _unknown(key, where, keys):
    close = difflib.get_close_matches(key, keys, n=1)
    return ConfigError(f"{where}; {f'did you mean {close[0]}? ' if close else ''}--help lists the keys")


def configure(defaults, argv):
    """Return a copy of `defaults` (a Keys) updated by the config files and --key=value args in argv; -h or --help
    prints the keys (with the values so far) and exits 0."""
    if not isinstance(defaults, Keys):
        raise TypeError("configure() takes a Keys definition: its descriptions are the command's --help")
    config = dict(defaults)
    for arg in argv:
        if arg in HELP:
            print(help_text(defaults, config))
            sys.exit(0)
        if not arg.startswith("--"):
            try:
                with open(arg) as f:
                    source = f.read()
            except OSError as e:
                raise ConfigError(f"cannot read config file {arg!r}: {e.strerror}; pass an existing .py file "
                                  "or --key=value") from None
            namespace = dict(config, __file__=arg)
            exec(compile(source, arg, "exec"), namespace)
            for key, value in namespace.items():
                if key.startswith("_") or isinstance(value, types.ModuleType) or key == "__builtins__":
                    continue
                if key not in config:
                    raise _unknown(key, f"{arg}: unknown config key {key!r}", defaults)
                config[key] = _check_type(key, value, defaults[key], arg)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"{arg}: expected --key=value")
        if key not in config:
            raise _unknown(key, f"unknown config key {key!r} in {arg}", defaults)
        if "=" in text:
            raise ConfigError(f"--{key}: value {text!r} contains '='; write one --key=value per key")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            if not isinstance(defaults[key], str) and defaults[key] is not None:
                raise ConfigError(f"--{key}: cannot parse {text!r} as {type(defaults[key]).__name__}") from None
            value = text  # bare strings: --init_from=resume
        if isinstance(defaults[key], str) and not isinstance(value, str):
            value = text  # --out_dir=123 stays a string
        config[key] = _check_type(key, value, defaults[key], f"--{key}")
    return config
