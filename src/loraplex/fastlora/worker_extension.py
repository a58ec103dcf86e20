"""Methods vLLM adds to its worker (``worker_extension_cls``) for the server's
``collective_rpc``: what the hot-adapter merge (``hot_merge``) is doing in the engine's process.
"""

from __future__ import annotations


class HotMergeReport:
    """Mixed into vLLM's worker class when ``merge_hot`` is on."""

    def loraplex_hot_merge(self) -> dict[str, int | None]:
        """The LoRA id served merged now (None: none), and the merges and unmerges so far."""
        from loraplex.fastlora.punica import wrappers

        merged, kinds = None, []
        for wrapper in wrappers():
            if wrapper.hot_merge is None:
                continue
            merged = wrapper.hot_merge.lora_id if merged is None else merged
            kinds += [kind for kind, _, _ in wrapper.hot_merge.events]
        return {
            "merged": merged,
            "merges": kinds.count("merge"),
            "unmerges": kinds.count("unmerge"),
        }
