/*
 * Walking XGBoost trees: the predictions of tree ensembles, exactly as XGBoost computes them.
 *
 * Why C: the edge scores one message at a time, and XGBoost spends about 175 µs on every
 * prediction call (its Python wrapper and C API) while the trees of one row cost a few µs.
 * Walking the trees here also spares the edge XGBoost itself, and the scipy it imports.
 *
 * Why the results equal XGBoost's bit for bit (tests/test_trees.py): features are float32 (the
 * caller converts, as XGBoost does), a row goes right when `value >= split` and takes the node's
 * default branch when the value is NaN, and each output is its base score plus its trees'
 * leaves, added one tree at a time in tree order, in float32.
 *
 * The caller (turbofan_core/trees.py) lays the trees out (see Node) and checks them before handing
 * them over: every child index lies inside the tree, every split feature below `width`, every
 * depth true. Here the buffer sizes and each tree's root, depth and output are checked. The walk
 * runs without the GIL.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <math.h>
#include <stdint.h>
#include <string.h>

/* One node in 16 bytes, so a step of the walk reads one cache line. Children are adjacent: a row
 * goes to `left` or `left + 1`, to the right when its value is at least `split`, or when it is
 * missing (NaN) and `missing_right` is set. A leaf's children are its terminal pair, two copies of
 * it whose children are the pair itself: a walk that reaches a leaf stays on its value, so every
 * walk of a tree takes the tree's depth in steps, without a branch on where it is. */
typedef struct {
    int32_t left;
    uint16_t feature;
    uint8_t missing_right, pad;
    float split, leaf;
} Node;

#define LANES 8      /* rows walked through one tree together: their steps are independent */
/* Rows taken through every tree at a time: their features stay in cache, and threads sharing a call
 * take blocks of them in turn, so neither waits long for the other at the end. */
#define BLOCK_ROWS 32

enum { X, NODES, ROOTS, DEPTHS, OUTPUTS, BASE, OUT, NEXT, N_BUFFERS };

/* Inlined where `count` is known, so the usual walk of LANES rows is unrolled. */
static inline __attribute__((always_inline)) void walk(const Node *node, int32_t root, int32_t depth,
                                                       const float *x, Py_ssize_t width, Py_ssize_t count,
                                                       float *out, Py_ssize_t outputs) {
    int32_t at[LANES];
    for (Py_ssize_t k = 0; k < count; k++) at[k] = root;
    for (int32_t d = 0; d < depth; d++) {
        for (Py_ssize_t k = 0; k < count; k++) {
            const Node *n = node + at[k];
            float v = x[k * width + n->feature];
            at[k] = n->left + (isnan(v) ? n->missing_right : !(v < n->split));
        }
    }
    for (Py_ssize_t k = 0; k < count; k++) out[k * outputs] += node[at[k]].leaf;
}

static int size_is(Py_buffer *buffer, Py_ssize_t items, Py_ssize_t item_size, const char *name) {
    if (buffer->len == items * item_size) return 0;
    PyErr_Format(PyExc_ValueError, "%s holds %zd bytes, expected %zd", name, buffer->len, items * item_size);
    return -1;
}

static PyObject *predict(PyObject *Py_UNUSED(module), PyObject *args) {
    Py_buffer b[N_BUFFERS] = {{0}};
    Py_ssize_t width;
    PyObject *result = NULL;
    if (!PyArg_ParseTuple(args, "y*ny*y*y*y*y*w*w*", &b[X], &width, &b[NODES], &b[ROOTS], &b[DEPTHS],
                          &b[OUTPUTS], &b[BASE], &b[OUT], &b[NEXT]))
        return NULL;
    Py_ssize_t nodes = b[NODES].len / (Py_ssize_t)sizeof(Node), trees = b[ROOTS].len / 4;
    Py_ssize_t outputs = b[BASE].len / 4, rows = width > 0 ? b[X].len / 4 / width : 0;
    if (width <= 0) {
        PyErr_SetString(PyExc_ValueError, "width must be positive");
        goto done;
    }
    if (size_is(&b[X], rows * width, 4, "x") < 0 ||
        size_is(&b[NODES], nodes, sizeof(Node), "nodes") < 0 || size_is(&b[ROOTS], trees, 4, "roots") < 0 ||
        size_is(&b[DEPTHS], trees, 4, "depths") < 0 ||
        size_is(&b[OUTPUTS], trees, 4, "outputs") < 0 || size_is(&b[OUT], rows * outputs, 4, "out") < 0 ||
        size_is(&b[NEXT], 1, 8, "next") < 0)
        goto done;
    if ((uintptr_t)b[NEXT].buf % 8 != 0 || __atomic_load_n((int64_t *)b[NEXT].buf, __ATOMIC_RELAXED) < 0) {
        PyErr_SetString(PyExc_ValueError, "next must be aligned to 8 bytes and not negative");
        goto done;
    }
    const int32_t *roots = b[ROOTS].buf, *depths = b[DEPTHS].buf, *tree_output = b[OUTPUTS].buf;
    for (Py_ssize_t t = 0; t < trees; t++) { /* once per tree, outside the walk */
        if (roots[t] < 0 || roots[t] >= nodes || depths[t] < 0 || tree_output[t] < 0 || tree_output[t] >= outputs) {
            PyErr_Format(PyExc_ValueError, "tree %zd: root, depth or output out of range", t);
            goto done;
        }
    }
    {
        const float *x = b[X].buf, *base = b[BASE].buf;
        const Node *node = b[NODES].buf;
        float *out = b[OUT].buf;
        int64_t *next = b[NEXT].buf;
        /* A block's outputs are summed here, then copied out: rows of two blocks may share a cache line
         * of `out`, and two threads adding to it tree after tree took turns owning that line. */
        float *sums = PyMem_Malloc(BLOCK_ROWS * outputs * sizeof(float));
        if (sums == NULL) {
            PyErr_NoMemory();
            goto done;
        }
        Py_BEGIN_ALLOW_THREADS;
        /* Block by block, as the shared counter hands them out; tree by tree within a block, so one
         * tree's nodes stay in cache across its rows. */
        for (;;) {
            const int64_t taken = __atomic_fetch_add(next, 1, __ATOMIC_RELAXED);
            if (taken < 0 || taken >= (rows + BLOCK_ROWS - 1) / BLOCK_ROWS) break; /* none left, or a bad count */
            const Py_ssize_t block = (Py_ssize_t)taken * BLOCK_ROWS;
            Py_ssize_t count = rows - block < BLOCK_ROWS ? rows - block : BLOCK_ROWS;
            for (Py_ssize_t r = 0; r < count; r++)
                for (Py_ssize_t o = 0; o < outputs; o++) sums[r * outputs + o] = base[o];
            for (Py_ssize_t t = 0; t < trees; t++) {
                for (Py_ssize_t r = 0; r < count; r += LANES) {
                    const float *rows_x = x + (block + r) * width;
                    float *o = sums + r * outputs + tree_output[t];
                    if (count - r >= LANES)
                        walk(node, roots[t], depths[t], rows_x, width, LANES, o, outputs);
                    else
                        walk(node, roots[t], depths[t], rows_x, width, count - r, o, outputs);
                }
            }
            memcpy(out + block * outputs, sums, count * outputs * sizeof(float));
        }
        Py_END_ALLOW_THREADS;
        PyMem_Free(sums);
    }
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < N_BUFFERS; i++)
        if (b[i].obj != NULL) PyBuffer_Release(&b[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"predict", predict, METH_VARARGS,
     "predict(x, width, nodes, roots, depths, outputs, base, out, next) -> None\n\n"
     "Writes each row's outputs into `out` (float32, rows x outputs). `x` is float32, rows x width; "
     "`nodes` holds every tree's nodes (int32 left child, uint16 feature, uint8 missing_right, a pad "
     "byte, float32 split, float32 leaf value); `roots`, `depths` and `outputs` (int32) give each "
     "tree's root node, depth and output index; `base` (float32) each output's base score. `next` "
     "(one int64, 0 at first) counts the blocks of rows taken: threads that call this at once with "
     "the same arguments share the rows out between them, each walking the blocks it takes."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "_trees",
    .m_doc = "The tree walk of XGBoost ensembles.",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__trees(void) { return PyModule_Create(&module); }
