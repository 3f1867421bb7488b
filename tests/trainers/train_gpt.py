# A stand-in for a contributor's train_gpt.py, in the public speedrun file's shape: a Hyperparameters class
# (some fields read from the environment), optimiser constructor calls with literal keywords, a process group
# made from torchrun's environment, a log file under logs/ and the speedrun's step lines on stdout. It trains a
# small bigram language model on a seeded Markov token stream, on CPU with gloo, in seconds.
import os
import signal
import sys
import time
import uuid
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class Muon(torch.optim.Optimizer):
    """Stand-in: momentum SGD on matrices (the real one orthogonalises the update)."""

    def __init__(self, params, lr=0.02, momentum=0.95, weight_decay=0.0):
        super().__init__(params, dict(lr=lr, momentum=momentum, weight_decay=weight_decay))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            for p in group["params"]:
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p))
                buf.mul_(group["momentum"]).add_(p.grad)
                p.mul_(1 - group["lr"] * group["weight_decay"]).add_(buf, alpha=-group["lr"] * max(1, p.size(0) / p.size(1)) ** 0.5)


class DistAdam(torch.optim.Adam):
    """Stand-in: Adam (the real one shards its state across ranks)."""


@dataclass
class Hyperparameters:
    vocab_size = 64
    model_dim = 32
    batch_size = 16
    seq_len = 32
    num_iterations = int(os.environ.get("NUM_ITERS", 40))
    cooldown_frac = 0.4
    val_loss_every = int(os.environ.get("VAL_EVERY", 8))
    val_tokens = int(os.environ.get("VAL_TOKENS", 8192))
    run_id = uuid.uuid4()


KILL_AT_STEP = 0  # tests: rank 1 SIGKILLs itself at this step (0: never)
STALL_AT_STEP = 0  # tests: rank 0 stops printing and sleeps at this step (0: never)
ABORT_AT_EXIT = False  # tests: rank 0 aborts after its last line, as a crash in a script's teardown would
args = Hyperparameters()

rank = int(os.environ["RANK"])
world_size = int(os.environ["WORLD_SIZE"])
local_rank = int(os.environ["LOCAL_RANK"])
dist.init_process_group(backend="gloo")
master_process = rank == 0
torch.manual_seed(int(os.environ.get("SEED", 0)))  # a contributor's file may take its seed from the environment
torch.set_num_threads(1)

logfile = None
if master_process:
    os.makedirs("logs", exist_ok=True)
    logfile = f"logs/{args.run_id}.txt"


def print0(s, console=False):
    if master_process:
        with open(logfile, "a") as f:
            if console:
                print(s)
            print(s, file=f)


print0(f"Running Python {sys.version} and torch {torch.__version__} on {world_size} ranks")


def markov_tokens(n, seed):
    g = torch.Generator().manual_seed(1234)
    transition = torch.softmax(torch.randn(args.vocab_size, args.vocab_size, generator=g) * 3, dim=-1)
    g.manual_seed(seed)
    out = torch.empty(n, dtype=torch.long)
    out[0] = 0
    for i in range(1, n):
        out[i] = torch.multinomial(transition[out[i - 1]], 1, generator=g)
    return out


class Bigram(nn.Module):
    def __init__(self, vocab_size, model_dim):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, model_dim)
        self.proj = nn.Linear(model_dim, model_dim, bias=False)
        self.head = nn.Linear(model_dim, vocab_size, bias=False)

    def forward(self, x, y):
        h = self.embed(x)
        h = h + torch.relu(self.proj(h))
        return F.cross_entropy(self.head(h).flatten(0, 1), y.flatten())


model = Bigram(args.vocab_size, args.model_dim)
for p in model.parameters():
    dist.broadcast(p.detach(), 0)
optimizer1 = DistAdam([model.embed.weight, model.head.weight], lr=0.02, betas=(0.8, 0.95), eps=1e-10, weight_decay=0.0)
optimizer2 = Muon([model.proj.weight], lr=0.05, momentum=0.95, weight_decay=0.0)
optimizers = [optimizer1, optimizer2]
for opt in optimizers:
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]


def get_lr(step):
    x = step / args.num_iterations
    return 1.0 if x < 1 - args.cooldown_frac else (1 - x) / args.cooldown_frac


tokens_per_batch = args.batch_size * (args.seq_len + 1)
train_stream = markov_tokens(tokens_per_batch * (args.num_iterations + 1), seed=1 + rank)
val_stream = markov_tokens(args.val_tokens + 1, seed=999)


def batch(stream, i, n):
    chunk = stream[i * n:(i + 1) * n].view(-1, args.seq_len + 1)
    return chunk[:, :-1], chunk[:, 1:]


training_time_ms = 0
torch_time = time.perf_counter()
train_steps = args.num_iterations
for step in range(train_steps + 1):
    last_step = step == train_steps
    if last_step or (args.val_loss_every > 0 and step % args.val_loss_every == 0):
        training_time_ms += 1000 * (time.perf_counter() - torch_time)
        model.eval()
        with torch.no_grad():
            x = val_stream[:-1].view(-1, args.seq_len)
            y = val_stream[1:].view(-1, args.seq_len)
            val_loss = model(x, y)
        dist.all_reduce(val_loss, op=dist.ReduceOp.AVG)
        print0(f"step:{step}/{train_steps} val_loss:{val_loss:.4f} train_time:{training_time_ms:.0f}ms "
               f"step_avg:{training_time_ms / max(step, 1):.2f}ms", console=True)
        model.train()
        torch_time = time.perf_counter()
    if last_step:
        break
    if KILL_AT_STEP and step == KILL_AT_STEP and rank == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    if STALL_AT_STEP and step == STALL_AT_STEP and master_process:
        time.sleep(3600)
    x, y = batch(train_stream, step, tokens_per_batch)
    model(x, y).backward()
    for p in model.parameters():
        dist.all_reduce(p.grad, op=dist.ReduceOp.AVG)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * get_lr(step)
        opt.step()
    model.zero_grad(set_to_none=True)
    approx_training_time_ms = training_time_ms + 1000 * (time.perf_counter() - torch_time)
    print0(f"step:{step + 1}/{train_steps} train_time:{approx_training_time_ms:.0f}ms "
           f"step_avg:{approx_training_time_ms / (step + 1):.2f}ms", console=True)

print0(f"peak memory allocated: 0 MiB reserved: 0 MiB", console=True)
# gloo (unlike NCCL) aborts a rank whose peer tears down first ("terminate called without an active exception",
# a third of the runs here): the ranks leave together
dist.barrier()
dist.destroy_process_group()
if ABORT_AT_EXIT and master_process:
    os.abort()
