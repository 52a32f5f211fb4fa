"""LoRA adapters of one simulated rank: which are registered, and which are loaded on the GPU.

- `LoraRegistry`: the adapters requests may name (`--lora-modules`, POST
  /v1/load_lora_adapter), with vLLM's ids (1, 2, ... in load order).
- `LoraSlots`: vLLM's `--max-loras` GPU slots, as llm-d's simulator models them. A request for
  an adapter runs only while the adapter holds a slot; it takes a free slot, or the slot of a
  loaded adapter no request is using (that adapter is unloaded). Loaded adapters count their
  running requests. The KV cache evicts blocks of adapters that are not loaded first.
"""

from kvcm.sim.errors import error
from kvcm.sim.kvcache import Lora


class LoraRegistry:
    """LoRA adapters registered in one rank."""

    def __init__(self, base_names):
        self._base = set(base_names)
        self._loras = {}
        self._next_id = 1

    def load(self, name, path):
        if name in self._base:
            raise error(400, "The lora adapter '%s' has the name of a served model." % name, param="lora_name")
        if name in self._loras:
            raise error(400, "The lora adapter '%s' has already been loaded." % name, param="lora_name")
        lora = self._loras[name] = Lora(self._next_id, name, path)
        self._next_id += 1
        return lora

    def unload(self, name):
        if self._loras.pop(name, None) is None:
            raise error(404, "The lora adapter '%s' cannot be found." % name, param="lora_name")

    def get(self, name):
        return self._loras.get(name)

    def __iter__(self):
        return iter(list(self._loras.values()))

    def __len__(self):
        return len(self._loras)


class LoraSlots:
    """`max_loras` GPU slots; `loaded` is the set of adapter names holding one."""

    def __init__(self, max_loras, registry):
        self.max_loras = max_loras
        self.registry = registry
        self.running = {}        # loaded adapter -> requests running with it
        self.loaded = set()

    def can_run(self, name):
        """Whether a request for adapter `name` (None: the base model) could start now."""
        if name is None or name in self.loaded:
            return True
        return len(self.loaded) < self.max_loras or any(not self.running[n] for n in self.loaded)

    def acquire(self, name):
        """A request for `name` starts (can_run(name) must hold)."""
        if name is None:
            return
        if name not in self.loaded:
            if len(self.loaded) >= self.max_loras:
                idle = next(n for n in self.loaded if not self.running[n])
                self._unload(idle)
            self.loaded.add(name)
            self.running[name] = 0
        self.running[name] += 1

    def release(self, name):
        """A request for `name` ended; an adapter unregistered meanwhile leaves its slot."""
        if name is None or name not in self.loaded:
            return
        self.running[name] -= 1
        if not self.running[name] and self.registry.get(name) is None:
            self._unload(name)

    def unregistered(self, name):
        """POST /v1/unload_lora_adapter: an idle adapter leaves its slot now, a busy one when
        its last request ends."""
        if name in self.loaded and not self.running[name]:
            self._unload(name)

    def _unload(self, name):
        self.loaded.discard(name)
        del self.running[name]
