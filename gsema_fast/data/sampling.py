"""The domain-balanced sampler of training cases, split between the ranks of a multi-process run."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class DomainBalancedSampler(torch.utils.data.Sampler):
    """Indices that visit the domains in rounds: each round takes one case from every domain (in a random order),
    each domain cycling through its own shuffled cases. Any K consecutive items hold one case per domain, so a batch
    of a multiple of K items is exactly balanced. The order depends only on (seed, epoch).

    Across ``num_replicas`` processes the rounds fill global batches of ``batch_size * num_replicas`` items and this
    ``rank`` takes its own ``batch_size`` of each: together the ranks see what one process with the global batch
    would. Within a global batch no case repeats while its domain has unused cases (a domain's next pick skips the
    cases the batch already holds), so ranks never train on the same case in one step."""

    def __init__(
        self,
        domains: Sequence[int],
        num_samples: int,
        seed: int = 0,
        *,
        batch_size: int = 1,
        num_replicas: int = 1,
        rank: int = 0,
    ):
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank={rank}: expected 0 <= rank < num_replicas={num_replicas}")
        self.by_domain = [np.flatnonzero(np.asarray(domains) == d) for d in sorted(set(domains))]
        self.num_samples = num_samples
        self.seed = seed
        self.batch_size = batch_size
        self.num_replicas = num_replicas
        self.rank = rank
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        self.epoch += 1  # without set_epoch, the next pass still differs
        queues = [list(rng.permutation(idx)) for idx in self.by_domain]
        global_batch = self.batch_size * self.num_replicas
        total = self.num_samples * self.num_replicas
        order: list[int] = []
        in_batch: set[int] = set()

        def take(k: int) -> int:
            queue = queues[k]
            for _ in range(2):  # the queue as it is, then with the domain's next shuffle in front of it
                for j in range(len(queue) - 1, -1, -1):  # pop order: from the end
                    if queue[j] not in in_batch:
                        return int(queue.pop(j))
                queue[:0] = list(rng.permutation(self.by_domain[k]))
            return int(queue.pop())  # the domain has fewer cases than its share of the batch

        while len(order) < total:
            for k in rng.permutation(len(queues)):
                if len(order) % global_batch == 0:
                    in_batch = set()
                index = take(k)
                in_batch.add(index)
                order.append(index)
        order = order[:total]
        mine = [
            i
            for g in range(0, total, global_batch)
            for i in order[g + self.rank * self.batch_size : g + (self.rank + 1) * self.batch_size]
        ]
        return iter(mine)
