"""nanoGPT-style configuration: plain-Python config files, then `--key=value` overrides.

    nanogpt-train configs/train_shakespeare_char.py --batch_size=32 --compile=False

A config file is executed as Python; every top-level name it assigns (not
starting with `_`) must be a known key. An override's value is parsed with
`ast.literal_eval` (falling back to a bare string for string keys). Unlike
nanoGPT, an unknown key, a wrong type or a stray `=` is a one-line error that
names the key.
"""
import ast
import types

from nanogpt.errors import UserError


class ConfigError(UserError, ValueError):
    pass


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


def configure(defaults, argv):
    """Return a copy of `defaults` updated by the config files and --key=value args in argv."""
    config = dict(defaults)
    for arg in argv:
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
                    raise ConfigError(f"{arg}: unknown config key {key!r}; known keys: {', '.join(sorted(defaults))}")
                config[key] = _check_type(key, value, defaults[key], arg)
            continue
        key, sep, text = arg[2:].partition("=")
        if not sep:
            raise ConfigError(f"{arg}: expected --key=value")
        if key not in config:
            raise ConfigError(f"unknown config key {key!r} in {arg}; known keys: {', '.join(sorted(defaults))}")
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
