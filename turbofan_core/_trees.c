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

/* One node in 16 bytes, so a step of the walk reads one cache line. Children are adjacent: a row
 * goes to `left` or `left + 1`. `feature` holds the split's feature and two flags: DEFAULT_LEFT
 * (where a missing value goes) and LEAF. A leaf is its own left child and never goes right, so a
 * walk that reaches it stays there: every walk of a tree takes the tree's depth in steps, without
 * a branch on where it is. */
typedef struct {
    int32_t left;
    uint32_t feature;
    float split, leaf;
} Node;

#define DEFAULT_LEFT 0x80000000u
#define LEAF 0x40000000u
#define FEATURE_BITS 0x3FFFFFFFu
#define LANES 8 /* rows walked through one tree together: their steps are independent */

enum { X, NODES, ROOTS, DEPTHS, OUTPUTS, BASE, OUT, N_BUFFERS };

static void walk(const Node *node, int32_t root, int32_t depth, const float *x, Py_ssize_t width,
                 Py_ssize_t count, float *out, Py_ssize_t outputs) {
    int32_t at[LANES];
    for (Py_ssize_t k = 0; k < count; k++) at[k] = root;
    for (int32_t d = 0; d < depth; d++) {
        for (Py_ssize_t k = 0; k < count; k++) {
            const Node *n = node + at[k];
            float v = x[k * width + (n->feature & FEATURE_BITS)];
            int go_right = isnan(v) ? !(n->feature & DEFAULT_LEFT) : !(v < n->split);
            at[k] = n->left + (go_right & !(n->feature & LEAF));
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
    if (!PyArg_ParseTuple(args, "y*ny*y*y*y*y*w*", &b[X], &width, &b[NODES], &b[ROOTS], &b[DEPTHS], &b[OUTPUTS],
                          &b[BASE], &b[OUT]))
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
        size_is(&b[OUTPUTS], trees, 4, "outputs") < 0 || size_is(&b[OUT], rows * outputs, 4, "out") < 0)
        goto done;
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
        Py_BEGIN_ALLOW_THREADS;
        for (Py_ssize_t r = 0; r < rows; r++)
            for (Py_ssize_t o = 0; o < outputs; o++) out[r * outputs + o] = base[o];
        /* Tree by tree, so one tree's nodes stay in cache across the rows. */
        for (Py_ssize_t t = 0; t < trees; t++) {
            for (Py_ssize_t r = 0; r < rows; r += LANES) {
                Py_ssize_t count = rows - r < LANES ? rows - r : LANES;
                walk(node, roots[t], depths[t], x + r * width, width, count, out + r * outputs + tree_output[t],
                     outputs);
            }
        }
        Py_END_ALLOW_THREADS;
    }
    result = Py_NewRef(Py_None);
done:
    for (int i = 0; i < N_BUFFERS; i++)
        if (b[i].obj != NULL) PyBuffer_Release(&b[i]);
    return result;
}

static PyMethodDef methods[] = {
    {"predict", predict, METH_VARARGS,
     "predict(x, width, nodes, roots, depths, outputs, base, out) -> None\n\n"
     "Writes each row's outputs into `out` (float32, rows x outputs). `x` is float32, rows x width; "
     "`nodes` holds every tree's nodes (int32 left child, uint32 feature with the flags, "
     "float32 split, float32 leaf value); `roots`, `depths` and `outputs` (int32) give each tree's "
     "root node, depth and output index; `base` (float32) each output's base score."},
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
