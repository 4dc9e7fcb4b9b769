"""The peers: llm.c and nanoGPT, built and run on the same card in the same call as ours, from snapshots of their
sources (../shared/peers, README.md there) that travel with the call in `.peers/`.

    carry.py       `python -m benchmarks.gpu.peers fetch` (here, before the call): the sources into .peers/, and the
                   wheels of the server's dependencies the device image lacks; on the device, the wheels installed
    llmc_build.py  llm.c built with cuDNN attention (`python -m benchmarks.gpu.peers build`, started in the
                   background at the call's first second: it needs only CPUs); the one change to llm.c's sources
                   is ../shared/peers/llm.c-cuda13.patch (CUDA 13's cudaMemAdvise; no managed-memory fallback)
    llmc.py        the llmc part: ./train_gpt2cu -e d12 at each training batch on the shards ours trains on
    nanogpt.py     the nanogpt part: bench.py under torch.compile, bf16, with GPT-2's biases
    points.py      a peer's point in the fields of ours; MFU by our FLOP count over the card's peak
"""
