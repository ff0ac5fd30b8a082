/* Streams token ids through a model, CHUNK tokens a call, from a state this program owns, and prints
 * each position's logits as the bits of their floats (hex), one line a position: the same numbers as
 * `stuffed logits --chunk CHUNK`.
 *
 *   cc -I capi examples/c/stream_logits.c -L target/release -lstuffed -o stream_logits
 *   ./stream_logits tests/data/mamba2_hf_g1_untied 1 5 9 2 40
 */
#include "stuffed.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static int die(const char *what) {
    fprintf(stderr, "stream_logits: %s: %s\n", what, stuffed_last_error());
    return 1;
}

int main(int argc, char **argv) {
    if (argc < 4) {
        fprintf(stderr, "usage: stream_logits MODEL CHUNK ID...\n");
        return 2;
    }
    StuffedModel *model = NULL;
    if (stuffed_open(argv[1], &model) != STUFFED_STATUS_OK) return die("open");
    StuffedInfo info;
    if (stuffed_info(model, &info) != STUFFED_STATUS_OK) return die("info");
    fprintf(stderr, "%s: d_model %zu, %zu layers, vocab %zu rows, state %zu bytes\n", info.family, info.d_model,
            info.n_layer, info.vocab_rows, info.state_bytes);

    size_t chunk = strtoul(argv[2], NULL, 10), n = (size_t)(argc - 3);
    if (stuffed_set_chunk(model, chunk) != STUFFED_STATUS_OK) return die("chunk");
    uint32_t *ids = malloc(n * sizeof *ids);
    for (size_t i = 0; i < n; i++) ids[i] = (uint32_t)strtoul(argv[3 + i], NULL, 10);

    /* The state is ours: sized by the handle, zeroed, updated by each call (a copy is a snapshot). */
    size_t state_len = stuffed_state_len(model);
    float *state = malloc(state_len * sizeof *state);
    if (stuffed_state_zero(model, state, state_len) != STUFFED_STATUS_OK) return die("state");
    float *logits = malloc(chunk * info.vocab_rows * sizeof *logits);
    for (size_t at = 0; at < n; at += chunk) {
        size_t t = n - at < chunk ? n - at : chunk;
        if (stuffed_forward(model, state, state_len, ids + at, t, logits, t * info.vocab_rows, 1) != STUFFED_STATUS_OK)
            return die("forward");
        for (size_t r = 0; r < t; r++) {
            for (size_t j = 0; j < info.vocab_rows; j++) {
                uint32_t bits;
                memcpy(&bits, &logits[r * info.vocab_rows + j], sizeof bits);
                printf(j ? " %08x" : "%08x", bits);
            }
            printf("\n");
        }
    }
    free(logits);
    free(state);
    free(ids);
    stuffed_close(model);
    return 0;
}
