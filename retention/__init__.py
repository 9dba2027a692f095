"""retention: how well does knowledge edited into a language model survive fine-tuning?

The Python API (:mod:`retention.api`) is imported on first use, so ``import retention`` stays cheap::

    import retention

    model, tokenizer = retention.load_model("smollm2-135m")
    facts = retention.select_known(model, tokenizer, retention.load_facts("builtin"), n=3)
    result = retention.edit(model, tokenizer, facts, editor="rome")
    print(retention.score(model, tokenizer, facts))

``retention.fit``, ``retention.run_study`` and ``retention.report`` run ``retention fit``, ``study`` and ``report``.
"""

__version__ = "0.1.0"

__all__ = ["CommandError", "EditResult", "KnowledgeRecord", "Scores", "__version__", "edit", "fit", "load_facts",
           "load_model", "report", "run_study", "score", "select_known"]

TYPE_CHECKING = False  # typing.TYPE_CHECKING without importing typing; type checkers read it as theirs
if TYPE_CHECKING:
    from retention.api import (
        CommandError,
        EditResult,
        KnowledgeRecord,
        Scores,
        edit,
        fit,
        load_facts,
        load_model,
        report,
        run_study,
        score,
        select_known,
    )


def __getattr__(name: str):
    """The API's names, imported on first use (torch and transformers load then, not at ``import retention``)."""
    if name in __all__ and name != "__version__":
        from retention import api

        value = getattr(api, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'retention' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
