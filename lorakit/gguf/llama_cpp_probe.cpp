// lorakit's llama.cpp probe: what a GGUF file gives in llama.cpp itself, through libllama's C API.
//   probe MODEL logits ID...       one line per position: the logits over the vocabulary
//   probe MODEL tokenize TEXT      the ids llama.cpp gives TEXT (special tokens parsed, BOS as the file says)
//   probe MODEL detokenize ID...   the text of the ids (special tokens rendered), as one line of hex bytes
#include "llama.h"
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);
}

int main(int argc, char ** argv) {
    if (argc < 3) { fprintf(stderr, "usage: %s MODEL logits|tokenize|detokenize ARGS...\n", argv[0]); return 2; }
    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model_params mparams = llama_model_default_params();
    mparams.n_gpu_layers = 0;
    mparams.progress_callback = [](float, void *) { return true; };  // no loading dots on the output
    llama_model * model = llama_model_load_from_file(argv[1], mparams);
    if (!model) { fprintf(stderr, "error: llama.cpp could not load %s\n", argv[1]); return 1; }
    const llama_vocab * vocab = llama_model_get_vocab(model);
    const std::string mode = argv[2];
    std::vector<llama_token> ids;
    if (mode == "tokenize") {
        const char * text = argc > 3 ? argv[3] : "";
        int n = -llama_tokenize(vocab, text, strlen(text), nullptr, 0, true, true);
        ids.resize(n);
        llama_tokenize(vocab, text, strlen(text), ids.data(), n, true, true);
        for (llama_token id : ids) printf("%d ", id);
        printf("\n");
        return 0;
    }
    for (int i = 3; i < argc; ++i) ids.push_back(atoi(argv[i]));
    if (mode == "detokenize") {
        std::vector<char> text(64 + 64 * ids.size());
        int n = llama_detokenize(vocab, ids.data(), ids.size(), text.data(), text.size(), false, true);
        if (n < 0) return 1;
        for (int i = 0; i < n; ++i) printf("%02x", (unsigned char) text[i]);
        printf("\n");
        return 0;
    }
    if (mode != "logits" || ids.empty()) { fprintf(stderr, "error: unknown mode %s\n", argv[2]); return 2; }
    llama_context_params cparams = llama_context_default_params();
    cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = ids.size() < 64 ? 64 : ids.size();
    cparams.n_threads = cparams.n_threads_batch = 1;
    // an f32 cache and no flash attention (whose CPU kernel rounds Q to f16): what differs is the file
    cparams.type_k = cparams.type_v = GGML_TYPE_F32;
    cparams.flash_attn_type = LLAMA_FLASH_ATTN_TYPE_DISABLED;
    llama_context * ctx = llama_init_from_model(model, cparams);
    if (!ctx) { fprintf(stderr, "error: no llama.cpp context\n"); return 1; }
    llama_batch_ext * batch = llama_batch_ext_init(ctx);
    for (size_t i = 0; i < ids.size(); ++i) {
        const int32_t idx = llama_batch_ext_add_token(batch, 0, ids[i]);
        const llama_pos pos = i;
        llama_batch_ext_set_pos(batch, idx, &pos);
        llama_batch_ext_set_output_logits(batch, idx, true);
    }
    if (llama_process(ctx, LLAMA_PROCESS_TYPE_DECODE, batch)) { fprintf(stderr, "error: decode failed\n"); return 1; }
    const int n_vocab = llama_vocab_n_tokens(vocab);
    for (size_t i = 0; i < ids.size(); ++i) {
        const float * logits = llama_get_logits_ith(ctx, i);
        for (int v = 0; v < n_vocab; ++v) printf(v ? " %.9g" : "%.9g", logits[v]);
        printf("\n");
    }
    llama_batch_ext_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}
