"""TA, Teacher-Assistant KD (Mirzadeh et al., AAAI 2020): teacher -> assistant(s) -> student.

Each arrow is an ordinary KD run from a frozen, trained model (the KD loss of section 1, batchmean:
not the official code's elementwise mean). The plan turns `assistants` into assistant jobs, trained
from scratch by KD with the student's schedule and the teachers' seed, and stored like teachers, so
every cell with the same teacher and assistant reuses them. `assistants`: a model name, a chain of
names (teacher side first), or "auto": the suite's model whose validation accuracy (data.val_size),
trained alone with the teachers' recipe, is closest to the mean of the teacher's and the student's (the paper's rule of
thumb), chosen at run time once those models are trained; with no suite model between teacher and
student in size, "auto" has no assistant and the cell is plain KD (recorded).
"""

from kdbench.losses import kd_terms
from kdbench.method import AUTO, Method, Needs, check_ranges


def chain_of(value) -> tuple[str, ...]:
    return (value,) if isinstance(value, str) else tuple(value)


class TAKD(Method):
    name = "takd"
    summary = "teacher -> assistant(s) -> student, each arrow KD; assistants named or auto, stored and reused"
    defaults = {"assistants": AUTO, "T": 4.0, "ce_weight": 0.1, "kd_weight": 0.9}
    param_types = {"assistants": (str, list)}
    teacher_logits_only = True  # reads only the (frozen) teacher's logits: shared teacher outputs apply

    @classmethod
    def needs(cls, params):
        chain = chain_of(params["assistants"])
        return Needs(teacher="trained", assistants=chain, choice="assistants 'auto'" if chain == (AUTO,) else "")

    @classmethod
    def check_params(cls, params):
        from kdbench.zoo import known_models

        chain = chain_of(params["assistants"])
        if not chain or not all(isinstance(a, str) for a in chain):
            return f"assistants must be 'auto', a model name or a list of model names, got {params['assistants']!r}"
        if chain != (AUTO,):
            unknown = [a for a in chain if a not in known_models()]
            if unknown:
                return f"assistants: unknown model {unknown[0]!r}"
        return check_ranges(params, positive=("T",), non_negative=("ce_weight", "kd_weight"))

    def losses(self, batch, student, teacher):
        p = self.params
        return kd_terms(student.logits, teacher.logits, batch.labels, p["T"], p["ce_weight"], p["kd_weight"])
