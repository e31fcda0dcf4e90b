"""kdbench model zoo, registered into timm.

Importing this package registers the models with ``timm`` so that
``timm.create_model("cifar_resnet56", num_classes=100)`` and
``timm.list_models("cifar_*")`` / ``timm.list_models("mnist_*")`` work.

CIFAR models (32x32 inputs, default ``num_classes=100``) reproduce the
architectures of the CRD benchmark (RepDistiller's ``models/``), with the same
parameter names; MNIST models (28x28x1, default ``num_classes=10``) are the
MLPs of Hinton et al. (2015), a small CNN and a convnet family of growing
width and depth (``mnist_convnet_*``) for capacity-gap studies.
"""
from ._common import StagedNet
from .cifar_mobilenetv2 import CifarMobileNetV2
from .cifar_resnet import CifarResNet
from .cifar_resnet50 import CifarResNetV2
from .cifar_shufflenetv1 import CifarShuffleNetV1
from .cifar_shufflenetv2 import CifarShuffleNetV2
from .cifar_vgg import CifarVGG
from .cifar_wrn import WideResNet
from .mnist import MnistCNN, MnistConvNet, MnistMLP

CIFAR_MODELS = (
    'cifar_resnet8', 'cifar_resnet14', 'cifar_resnet20', 'cifar_resnet32', 'cifar_resnet44', 'cifar_resnet56',
    'cifar_resnet110', 'cifar_resnet8x4', 'cifar_resnet32x4', 'cifar_resnet50',
    'cifar_wrn_16_1', 'cifar_wrn_16_2', 'cifar_wrn_40_1', 'cifar_wrn_40_2',
    'cifar_vgg8', 'cifar_vgg11', 'cifar_vgg13', 'cifar_vgg16', 'cifar_vgg19',
    'cifar_mobilenetv2', 'cifar_mobilenetv2_half', 'cifar_shufflenetv1', 'cifar_shufflenetv2',
)
MNIST_MODELS = (
    'mnist_mlp', 'mnist_mlp_1200x2', 'mnist_mlp_800x2', 'mnist_mlp_400x2', 'mnist_mlp_100x2', 'mnist_mlp_30x2',
    'mnist_cnn', 'mnist_convnet_4x1', 'mnist_convnet_8x1', 'mnist_convnet_16x1', 'mnist_convnet_32x1',
    'mnist_convnet_48x1', 'mnist_convnet_32x2', 'mnist_convnet_64x2',
)

__all__ = [
    'StagedNet', 'CifarResNet', 'CifarResNetV2', 'WideResNet', 'CifarVGG', 'CifarMobileNetV2',
    'CifarShuffleNetV1', 'CifarShuffleNetV2', 'MnistMLP', 'MnistCNN', 'MnistConvNet', 'CIFAR_MODELS', 'MNIST_MODELS',
]
