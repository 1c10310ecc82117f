"""``python -m hybridssm.bench SPEC``: one peak-memory measurement (:mod:`hybridssm.bench.memory`),
printed as a JSON line."""

import json
import sys

from hybridssm.bench.memory import measure_child

print(json.dumps(measure_child(json.loads(sys.argv[1]))))
