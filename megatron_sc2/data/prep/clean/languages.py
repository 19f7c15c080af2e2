"""Programming language of a file from its name, as GitHub Linguist assigns extensions.

The table covers the high-resource languages StarCoder2-3B/7B were trained on (`CORE_LANGUAGES`:
18 names, a superset of their 17; the exact list could not be checked offline) and ~50 other
common ones of The Stack v2. A file name listed whole (`Makefile`, `Dockerfile`) wins over its extension;
an extension claimed by two languages goes to the first one listed here.
"""

from __future__ import annotations

from typing import Optional

# language -> (extensions with the dot, whole file names)
LANGUAGES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    # CORE_LANGUAGES
    "C": ((".c", ".h"), ()),
    "C#": ((".cs", ".csx"), ()),
    "C++": ((".cpp", ".cc", ".cxx", ".c++", ".hpp", ".hh", ".hxx", ".h++", ".ipp", ".tpp", ".inl"), ()),
    "Go": ((".go",), ()),
    "Java": ((".java",), ()),
    "JavaScript": ((".js", ".mjs", ".cjs", ".jsx"), ()),
    "Kotlin": ((".kt", ".kts"), ()),
    "Lua": ((".lua",), ()),
    "PHP": ((".php", ".phtml", ".php3", ".php4", ".php5"), ()),
    "Python": ((".py", ".pyi", ".pyw", ".pyx", ".pxd"), ("SConstruct", "SConscript")),
    "R": ((".r", ".R", ".rmd", ".Rmd"), ()),
    "Ruby": ((".rb", ".rake", ".gemspec", ".ru"), ("Rakefile", "Gemfile", "Vagrantfile")),
    "Rust": ((".rs",), ()),
    "Scala": ((".scala", ".sc", ".sbt"), ()),
    "Shell": ((".sh", ".bash", ".zsh", ".ksh"), (".bashrc", ".bash_profile", ".zshrc", ".profile")),
    "SQL": ((".sql",), ()),
    "Swift": ((".swift",), ()),
    "TypeScript": ((".ts", ".tsx", ".mts", ".cts"), ()),
    # more of The Stack v2's languages
    "Assembly": ((".asm", ".s", ".S", ".nasm"), ()),
    "Batchfile": ((".bat", ".cmd"), ()),
    "Clojure": ((".clj", ".cljs", ".cljc", ".edn"), ()),
    "CMake": ((".cmake",), ("CMakeLists.txt",)),
    "CoffeeScript": ((".coffee",), ()),
    "Common Lisp": ((".lisp", ".lsp", ".cl"), ()),
    "CSS": ((".css",), ()),
    "CUDA": ((".cu", ".cuh"), ()),
    "Dart": ((".dart",), ()),
    "Dockerfile": ((".dockerfile",), ("Dockerfile", "Containerfile")),
    "Elixir": ((".ex", ".exs"), ()),
    "Elm": ((".elm",), ()),
    "Emacs Lisp": ((".el",), (".emacs",)),
    "Erlang": ((".erl", ".hrl"), ()),
    "F#": ((".fs", ".fsi", ".fsx"), ()),
    "Fortran": ((".f", ".f90", ".f95", ".f03", ".for"), ()),
    "GLSL": ((".glsl", ".vert", ".frag"), ()),
    "Groovy": ((".groovy", ".gradle"), ("Jenkinsfile",)),
    "Haskell": ((".hs", ".lhs"), ()),
    "HTML": ((".html", ".htm", ".xhtml"), ()),
    "Java Server Pages": ((".jsp",), ()),
    "JSON": ((".json", ".jsonc", ".geojson"), ()),
    "Julia": ((".jl",), ()),
    "Jupyter Notebook": ((".ipynb",), ()),
    "Makefile": ((".mk", ".mak"), ("Makefile", "makefile", "GNUmakefile")),
    "Markdown": ((".md", ".markdown"), ()),
    "Nix": ((".nix",), ()),
    "Objective-C": ((".m",), ()),
    "Objective-C++": ((".mm",), ()),
    "OCaml": ((".ml", ".mli"), ()),
    "Pascal": ((".pas", ".pp"), ()),
    "Perl": ((".pl", ".pm", ".t"), ()),
    "PowerShell": ((".ps1", ".psm1", ".psd1"), ()),
    "Prolog": ((".pro", ".prolog"), ()),
    "Protocol Buffer": ((".proto",), ()),
    "Racket": ((".rkt",), ()),
    "reStructuredText": ((".rst",), ()),
    "Sass": ((".sass",), ()),
    "SCSS": ((".scss",), ()),
    "Scheme": ((".scm", ".ss"), ()),
    "Solidity": ((".sol",), ()),
    "Tcl": ((".tcl",), ()),
    "TeX": ((".tex", ".sty", ".cls"), ()),
    "TOML": ((".toml",), ()),
    "Verilog": ((".v", ".vh"), ()),
    "SystemVerilog": ((".sv", ".svh"), ()),
    "VHDL": ((".vhd", ".vhdl"), ()),
    "Visual Basic .NET": ((".vb",), ()),
    "Vue": ((".vue",), ()),
    "XML": ((".xml", ".xsd", ".xsl", ".svg"), ()),
    "YAML": ((".yml", ".yaml"), ()),
    "Zig": ((".zig",), ()),
}

CORE_LANGUAGES = ("C", "C#", "C++", "Go", "Java", "JavaScript", "Kotlin", "Lua", "PHP", "Python",
                    "R", "Ruby", "Rust", "Scala", "Shell", "SQL", "Swift", "TypeScript")

_BY_NAME: dict[str, str] = {}
_BY_EXT: dict[str, str] = {}
for _lang, (_exts, _names) in LANGUAGES.items():
    for _n in _names:
        _BY_NAME.setdefault(_n, _lang)
    for _e in _exts:
        _BY_EXT.setdefault(_e, _lang)
        _BY_EXT.setdefault(_e.lower(), _lang)
_CANONICAL = {k.lower(): k for k in LANGUAGES}
_ALIASES = {"c++": "C++", "cpp": "C++", "c#": "C#", "csharp": "C#", "js": "JavaScript",
            "ts": "TypeScript", "bash": "Shell", "sh": "Shell", "golang": "Go", "py": "Python"}


def language_of(path: str) -> Optional[str]:
    """The language of a file name (the last path component decides), None when unknown."""
    name = path.rsplit("/", 1)[-1]
    if name in _BY_NAME:
        return _BY_NAME[name]
    dot = name.rfind(".")
    if dot <= 0 and not name.startswith("."):
        return None
    ext = name[dot:] if dot > 0 else name
    return _BY_EXT.get(ext) or _BY_EXT.get(ext.lower())


def canonical_language(name: str) -> Optional[str]:
    """A user's spelling of a language (`python`, `cpp`, `C#`) as the table names it."""
    key = name.strip().lower()
    return _ALIASES.get(key) or _CANONICAL.get(key)
